from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent

setup(
    name="hallupatch",
    version="0.1.0",
    description="Decoding-time hallucination mitigation for multimodal LLMs by patching Hugging Face model code.",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["hallupatch", "hallupatch.eval", "hallupatch.eval.tasks", "hallupatch.methods", "hallupatch.prior",
              "hallupatch.testing", "hallupatch.lab", "hallupatch.lmms", "hallupatch.patches", "hallupatch.dropin"],
    # The family specs and the drop-in modeling files live at the top level of the repository
    # (the product's layout) and are installed inside the package.
    package_dir={"hallupatch.patches": "patches", "hallupatch.dropin": "modeling"},
    # the lab's trained checkpoints (fp16 safetensors, processor files, training.json and the model card
    # README.md with every file's sha256) ship inside the package: the default one and one per extra seed
    package_data={"hallupatch.dropin": ["*.py"], "hallupatch": ["data/*"], "hallupatch.lab": ["checkpoint/*", "seeds/*/*"],
                  "hallupatch.lmms": ["lab_tasks/*"]},
    install_requires=[
        "transformers==4.40.0",
        "torch",
        "safetensors",
        "huggingface-hub",
        "datasets",
        "evaluate",
        "tqdm",
        "Pillow",  # images: transformers' image processors and the benchmarks' image files need it
        "lemminflect",  # CHAIR's singulariser: ships its data, works offline (NLTK's data cannot be pip-installed)
        "pycocoevalcap",  # official COCO caption metrics (BLEU/METEOR/ROUGE-L/CIDEr); needs a Java runtime
        "matplotlib",  # the lab comparison's figure (lab.png): scores with intervals, entropy profile, layers
    ],
    # accelerate: `accelerate launch -m hallupatch.eval` shards a benchmark over processes/GPUs
    # (its PartialState gives rank, world size, device and barriers); the test installs it to check that.
    # peft (tests only): real PeftModel wrappers for apply()'s PEFT support; 0.11.1 matches transformers 4.40
    # lmms: hallupatch as an lmms-eval model plug-in (hallupatch/lmms/). lmms-eval 0.7.3 resolves on the
    # project's pins only with torchvision pinned (otherwise pip upgrades torch and pulls CUDA wheels) and needs
    # filelock<4 (its evaluator imports filelock._api, removed in filelock 4; pip's resolver does not know).
    # scipy, statsmodels (tests only): independent references for the exact McNemar test, its power and
    # the Holm correction (hallupatch.eval.stats computes them with numpy alone)
    extras_require={"test": ["pytest", "accelerate", "peft==0.11.1", "scipy", "statsmodels"], "eval": ["accelerate"],
                    "lmms": ["lmms-eval==0.7.3", "torchvision==0.28.0", "filelock<4"]},
    # lmms-eval finds the model `hallupatch` through this entry point (lmms_eval/models/registry_v2.py)
    entry_points={"lmms_eval.models": ["hallupatch = hallupatch.lmms:manifest"]},
)
