"""Online learning: the learner that folds the event log into model versions, item admission and
prequential evaluation. The event log itself lives in :mod:`recloop.events`."""
