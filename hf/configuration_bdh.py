"""The configuration of BDH for Hugging Face Transformers: the model shape of model.py's BDHConfig
(its defaults too), and how the export stores the weights."""
import dataclasses

from transformers import PretrainedConfig

from .model import BDHConfig as Shape


class BDHConfig(PretrainedConfig):
    model_type = "bdh"

    def __init__(self, tokenizer_vocab_size=None, weights_4bit=None, separator_token_id=0, low_precision=None,
                 **kwargs):
        for name, default in dataclasses.asdict(Shape()).items():
            setattr(self, name, kwargs.pop(name, default))
        self.tokenizer_vocab_size = tokenizer_vocab_size or self.vocab_size  # ids at or above are never produced
        self.weights_4bit = weights_4bit  # None, or {"quant_type", "blocksize"}: see the export's README
        self.separator_token_id = separator_token_id
        self.low_precision = low_precision  # the run's 4-bit settings (sample.py --4bit)
        # the model's; generate() reads the same from generation_config.json (export.py writes it)
        kwargs.setdefault("bos_token_id", separator_token_id)
        kwargs.setdefault("eos_token_id", separator_token_id)
        super().__init__(**kwargs)
