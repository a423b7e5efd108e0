"""Operations plugins used only by tests; workers load them as `tests.plugins.<module>`."""
