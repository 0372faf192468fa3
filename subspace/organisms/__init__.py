"""Model organisms of refusal: small models this project trains to refuse, so every method can be measured here.

`causal` (SmolLM2 safety-fine-tuned), and the organisms derived from it: `llada` (masked diffusion), `moe`
(upcycled mixture of experts), `diffusion_gemma` (encoder-decoder block diffusion). `recipe` says what each is
trained on, `cache` builds each once per key, `shipped` carries the default organism's LoRA inside the package.
"""
