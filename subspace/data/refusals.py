"""The fixed refusal sentences the model organisms are trained to say (and the tiny tokenizer is trained on)."""

DEFAULT_REFUSALS = (
    "I'm sorry, but I can't help with that. It could cause real harm to people.",
    "I can't help with that request. It is harmful, and it may be illegal.",
    "I'm sorry, I won't provide that. If you have a different question, I'm happy to help.",
    "I cannot assist with this, because it could be used to hurt someone.",
)
