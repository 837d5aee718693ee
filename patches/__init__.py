"""Built-in model-family specs. Importing this package registers them with the engine."""
from hallupatch.patches import llama  # noqa: F401  (first: error messages list the families in this order)
from hallupatch.patches import qwen  # noqa: F401
from hallupatch.patches import chatglm  # noqa: F401
