"""canary-qwen-2.5b's architecture as released, and the tiny preset's shrunk copy of it: the shapes `build_random`
builds offline with random weights (tiny: tests and the demo; full: GPU benchmarks, where speed and memory do not
depend on the weights). Sources of the released shapes: docs/model.md. Pure data and one folder writer, no NeMo.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

TINY = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 16, "ffn": 128, "vocab": 512}

# canary-qwen-2.5b's architecture as released (HF config.json): built offline with random weights (tests at
# reduced depth, GPU benchmarks at full size).
RELEASED_LLM = {  # Qwen/Qwen3-1.7B
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 40960,
}
RELEASED_PERCEPTION: dict[str, Any] = {  # nvidia/canary-1b-flash's FastConformer + a 1024 -> 2048 projection
    "target": "nemo.collections.speechlm2.modules.perception.AudioPerceptionModule",
    "output_dim": 2048,
    "modality_adapter": {
        "_target_": "nemo.collections.speechlm2.modules.perception.IdentityConnector",
        "d_model": 1024,
    },
    "preprocessor": {
        "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
        "sample_rate": 16000,
        "normalize": "per_feature",
        "window_size": 0.025,
        "window_stride": 0.01,
        "window": "hann",
        "features": 128,
        "n_fft": 512,
        "log": True,
        "frame_splicing": 1,
        "dither": 1e-05,
        "pad_to": 0,
        "pad_value": 0.0,
    },
    "encoder": {
        "_target_": "nemo.collections.asr.modules.ConformerEncoder",
        "feat_in": 128,
        "feat_out": -1,
        "n_layers": 32,
        "d_model": 1024,
        "subsampling": "dw_striding",
        "subsampling_factor": 8,
        "subsampling_conv_channels": 256,
        "causal_downsampling": False,
        "ff_expansion_factor": 4,
        "self_attention_model": "rel_pos",
        "n_heads": 8,
        "att_context_size": [-1, -1],
        "xscaling": False,
        "untie_biases": True,
        "pos_emb_max_len": 5000,
        "conv_kernel_size": 9,
        "conv_norm_type": "batch_norm",
        "dropout": 0.1,
        "dropout_pre_encoder": 0.1,
        "dropout_emb": 0.0,
        "dropout_att": 0.1,
    },
}


TINY_LLM = {
    "hidden_size": TINY["hidden"],
    "intermediate_size": TINY["ffn"],
    "num_hidden_layers": TINY["layers"],
    "num_attention_heads": TINY["heads"],
    "num_key_value_heads": TINY["kv_heads"],
    "head_dim": TINY["head_dim"],
    "tie_word_embeddings": True,
    "max_position_embeddings": 4096,
}


def random_llm_dir(out: Path, shape: dict[str, Any]) -> Path:
    """An HF folder NeMo can build a random-weight Qwen3 LLM from (`pretrained_weights: False` reads only the
    config): a byte-level BPE tokenizer with Qwen's chat special tokens, trained on a corpus shipped in this
    package, and a Qwen3Config of `shape` (TINY_LLM, or RELEASED_LLM for canary-qwen's full size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config

    corpus = resources.files("medasr.resources").joinpath("tokenizer_corpus.txt").read_text(encoding="utf-8")
    lines = [line for line in corpus.splitlines() if line and not line.startswith("#")]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        lines,
        trainers.BpeTrainer(
            vocab_size=TINY["vocab"],
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.save_pretrained(out)
    config = Qwen3Config(
        # the released vocabulary size when given (embedding and LM-head cost); else room for the audio tag
        vocab_size=shape.get("vocab_size", len(fast) + 8),
        **{k: v for k, v in shape.items() if k != "vocab_size"},
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        bos_token_id=None,
    )
    config.save_pretrained(out)
    return out


def tiny_perception(llm_hidden: int) -> dict[str, Any]:
    """The released perception (preprocessor, FastConformer, projection) shrunk: 2 layers, width 64, no dropout,
    no dither (tests compare tensors bit for bit)."""
    d = TINY["hidden"]
    perception: Any = copy.deepcopy(RELEASED_PERCEPTION)
    perception["output_dim"] = llm_hidden
    perception["modality_adapter"]["d_model"] = d
    perception["preprocessor"]["dither"] = 0.0
    perception["encoder"].update(
        n_layers=2,
        d_model=d,
        n_heads=4,
        subsampling_conv_channels=d,
        ff_expansion_factor=2,
        dropout=0.0,
        dropout_pre_encoder=0.0,
        dropout_emb=0.0,
        dropout_att=0.0,
    )
    return perception
