"""LLaDA (bidirectional masked diffusion) without remote code: configuration, model, loading.

Importing this package registers the classes with transformers' Auto classes, so
`AutoConfig`/`AutoModel`/`AutoTokenizer` read a LLaDA directory without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel

from subspace.models.llada.configuration import LLaDAConfig
from subspace.models.llada.modeling import LLaDAModelLM

AutoConfig.register(LLaDAConfig.model_type, LLaDAConfig, exist_ok=True)
AutoModel.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)

__all__ = ["LLaDAConfig", "LLaDAModelLM"]
