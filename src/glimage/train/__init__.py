"""Training of every GLM-Image stage (vae, tokenizer, ar, decoder, LoRA) on PyTorch's own distributed stack."""
