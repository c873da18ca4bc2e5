"""Model architectures, tokenizers, and loading/saving in Hugging Face format."""
