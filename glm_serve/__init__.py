"""glm-serve: a local inference server for the open GLM-4 weights.

    from glm_serve import LLM, SamplingParams
"""

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    # Lazy: `import glm_serve` (the CLI's --help, the kernels) must not pull in torch and the engine.
    if name == "LLM":
        from glm_serve.llm import LLM

        return LLM
    if name == "SamplingParams":
        from glm_serve.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'glm_serve' has no attribute {name!r}")
