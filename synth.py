"""Spatial mixture synthesizer (SpAudSyn-compatible) and the datasets that feed training and evaluation.

    python synth.py --bench --data data/dev_set     # ms per generated training mixture, with a breakdown
"""
# Constants owned by the data side; every other file imports them from here.
SAMPLE_RATE = 32000  # Hz, the only rate the dev set and the models use
NUM_SLOTS = 3  # output slots per mixture (up to three target events)
SILENCE = "silence"  # label of an empty slot
LABELS = (  # the 18 target classes, in the official index order
    "AlarmClock", "BicycleBell", "Blender", "Buzzer", "Clapping", "Cough", "CupboardOpenClose", "Dishes",
    "Doorbell", "FootSteps", "HairDryer", "MechanicalFans", "MusicalKeyboard", "Percussion", "Pour", "Speech",
    "Typing", "VacuumCleaner",
)

import re


def parse_source_name(soundscape: str, filename: str) -> tuple[int | None, str]:
    """Split a source file name '<soundscape>_<n>_<label>.wav' or '<soundscape>_<label>.wav' into (n, label).

    n is None for the 2025 naming without slot index. Raises ValueError when the name does not belong to the
    soundscape or the label is not one of LABELS.
    """
    match = re.fullmatch(re.escape(soundscape) + r"(?:_(\d+))?_(.+)\.wav", filename)
    if match is None:
        raise ValueError(f"{filename}: expected '{soundscape}_<n>_<label>.wav' or '{soundscape}_<label>.wav'")
    index, label = match.groups()
    if label not in LABELS:
        raise ValueError(f"{filename}: unknown label {label!r}; expected one of {', '.join(LABELS)}")
    return (int(index) if index is not None else None), label
