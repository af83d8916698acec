"""Loading models: the policy (full or LoRA, quantised or not), the tokenizer, precision, the frozen feature
network, and where a base model comes from (hub id, folder, .gguf file)."""
