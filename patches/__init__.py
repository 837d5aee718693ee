"""Built-in model-family specs. Importing this package registers them with the engine."""
from hallupatch.patches import chatglm, llama, qwen  # noqa: F401
