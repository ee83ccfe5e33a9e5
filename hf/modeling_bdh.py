"""BDH for Hugging Face Transformers (AutoModelForCausalLM with trust_remote_code=True). The layers
are computed by model.py beside this file, the training repository's own: generation carries BDH's
recurrent state as its cache, so each new token costs the same whatever the context; a forward with
gradients (Trainer) runs the parallel form with the backward train.py uses."""
import contextlib

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_bdh import BDHConfig
from .model import (LAYER_WEIGHTS, BDH, empty_states, parallel_forward, recurrent_forward, rope_frequencies,
                    unpack_4bit)
from .model import BDHConfig as Shape


# Transformers 5.x renamed the cache of the model's inputs and outputs from past_key_values to cache (generate
# passes it back under the output's name): both are taken, and the output holds it under the version's name
CACHE_OUTPUT = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class BDHState:
    """The generation cache: each layer's state (H, B, N, D) and the number of positions it holds."""

    def __init__(self, states, seen=0):
        self.states, self.seen = states, seen

    def get_seq_length(self, layer_idx=0) -> int:
        return self.seen


class BDHForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = BDHConfig
    accepts_loss_kwargs = False  # the loss is a mean over the labels: Trainer divides it by its accumulation steps
    # gradient_checkpointing_enable() (Trainer's gradient_checkpointing=True) sets gradient_checkpointing: model.py's
    # own recompute (train.py's activation_checkpointing) keeps each layer's input and recomputes it in backward
    supports_gradient_checkpointing = True

    def __init__(self, config: BDHConfig):
        super().__init__(config)
        shape = Shape(**{k: getattr(config, k) for k in Shape.__dataclass_fields__})
        core = BDH(shape)  # the parameters, under the names of the training checkpoints
        self.shape, self.embed, self.lm_head = shape, core.embed, core.lm_head
        self.weight_shapes = {name: getattr(core, name).shape for name in LAYER_WEIGHTS}
        if config.weights_4bit:  # 4-bit codes and per-block scales, unpacked at every forward
            for name in LAYER_WEIGHTS:
                numel = getattr(core, name).numel()
                self.register_buffer(f"{name}_4bit", torch.zeros((numel + 1) // 2, dtype=torch.uint8))
                self.register_buffer(f"{name}_absmax", torch.zeros(-(-numel // config.weights_4bit["blocksize"])))
            self.register_buffer("quant_map", torch.zeros(16))
        else:
            self.encoder, self.encoder_v, self.decoder = core.encoder, core.encoder_v, core.decoder
        self.gradient_checkpointing = False
        self.post_init()

    def _init_weights(self, module):
        pass  # BDH() initialised them; loading replaces them

    @property
    def rope_freqs(self):  # derived from the shape: computed here, as Transformers loads only saved tensors
        return rope_frequencies(self.shape.n_latent).to(self.embed.weight.device)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is BDHState, made by forward

    def layer_weights(self):
        if not self.config.weights_4bit:
            return self.encoder, self.encoder_v, self.decoder
        return tuple(unpack_4bit(getattr(self, f"{name}_4bit"), getattr(self, f"{name}_absmax"), self.quant_map,
                                 self.weight_shapes[name], self.config.weights_4bit["blocksize"],
                                 self.embed.weight.dtype)  # (loaded with torch_dtype=torch.bfloat16: bfloat16)
                     for name in LAYER_WEIGHTS)

    def forward(self, input_ids, cache=None, past_key_values=None, labels=None, use_cache=None, attention_mask=None,
                **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("BDH has no padding mask: give prompts of equal length (or one at a time)")
        cache = cache if cache is not None else past_key_values
        # fine-tuning: the parallel form, with train.py's backward; the recurrent form (a cache) has none, so its
        # outputs carry no gradient (loss.backward(): torch's "does not require grad", not a failure inside model.py)
        differentiable = torch.is_grad_enabled() and cache is None
        with torch.set_grad_enabled(differentiable):
            if differentiable:
                dtype = self.embed.weight.dtype  # bfloat16 weights: model.py's backward computes in autocast's dtype
                with (torch.autocast(input_ids.device.type, dtype=dtype) if dtype != torch.float32 else
                      contextlib.nullcontext()):  # (float32: as the caller's autocast, if any, says)
                    dropout = self.config.dropout if self.training else 0.0
                    hidden = parallel_forward(self, input_ids, self.layer_weights(), dropout,
                                              self.gradient_checkpointing)
                if labels is None and use_cache is not False and not self.training:  # (inference that may go on)
                    with torch.no_grad():
                        cache = self.forward(input_ids, use_cache=True)[CACHE_OUTPUT]
            else:
                if cache is None:
                    cache = BDHState(empty_states(self.shape, input_ids.size(0), input_ids.device))
                hidden = recurrent_forward(self, input_ids, cache.states, cache.seen, self.layer_weights())
                cache.seen += input_ids.size(1)
            logits = hidden @ self.lm_head
            logits[..., self.config.tokenizer_vocab_size:] = float("-inf")  # ids no tokenizer produces
        loss = None
        if labels is not None:  # the Transformers convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))
        output = CausalLMOutputWithPast(loss=loss, logits=logits)
        if use_cache is not False and cache is not None:
            output[CACHE_OUTPUT] = cache
        return output
