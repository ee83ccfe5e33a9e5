"""The configuration of BDH for Hugging Face Transformers: the model shape of model.py's BDHConfig,
and how the export stores the weights."""
from transformers import PretrainedConfig


class BDHConfig(PretrainedConfig):
    model_type = "bdh"

    def __init__(self, n_layer=6, n_embd=256, dropout=0.1, n_head=4, mlp_internal_dim_multiplier=128,
                 vocab_size=256, tokenizer_vocab_size=None, weights_4bit=None, separator_token_id=0, **kwargs):
        self.n_layer, self.n_embd, self.dropout, self.n_head = n_layer, n_embd, dropout, n_head
        self.mlp_internal_dim_multiplier, self.vocab_size = mlp_internal_dim_multiplier, vocab_size
        self.tokenizer_vocab_size = tokenizer_vocab_size or vocab_size  # ids at or above it are never produced
        self.weights_4bit = weights_4bit  # None, or {"quant_type", "blocksize"}: see the export's README
        self.separator_token_id = separator_token_id
        kwargs.setdefault("bos_token_id", separator_token_id)  # generation without a prompt starts here
        kwargs.setdefault("eos_token_id", separator_token_id)
        super().__init__(**kwargs)
