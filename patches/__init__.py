"""Built-in model-family specs. Importing this package registers them with the engine."""
from hallupatch.patches import llama  # noqa: F401
