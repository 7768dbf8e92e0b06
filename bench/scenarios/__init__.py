"""The scenarios of issue 5, one module each: ``run(ctx) -> dict`` of raw measurements."""
