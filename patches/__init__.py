"""Built-in model-family specs. Importing this package registers them with the engine, in detection order
(which is also the order of ``hallupatch.supported()`` and of the error messages)."""
from hallupatch.patches import llava_next  # noqa: F401  (before llama: a LLaVA-NeXT model has llama's structure too)
from hallupatch.patches import idefics2  # noqa: F401
from hallupatch.patches import qwen2_vl  # noqa: F401  (before llama: its decoder has llama's structure)
from hallupatch.patches import llama  # noqa: F401
from hallupatch.patches import qwen  # noqa: F401
from hallupatch.patches import chatglm  # noqa: F401
