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
