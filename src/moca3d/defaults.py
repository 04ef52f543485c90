"""Default sampling settings shared by the pipeline, the CLI, the evaluation and the demo (measured: README)."""

STEPS = 50  # Euler steps; 100 scored the same on the built-in object model (README, Built-in model)
GUIDANCE = 7.0  # classifier-free guidance for objects: the built-in model's best of 4, 7 and 10
SCENE_GUIDANCE = 2.0  # for scenes: the built-in scene model's best of 1, 2, 3, 4, 7 and 10 (README, scene guidance)
