"""Small random-weight models of every family and task Shipyard supports, made by the tests.

Every weight is drawn at random (no zero biases, no identical tensors), so exactness tests see
real arithmetic and exporters cannot deduplicate tensors. RoBERTa gets a real byte-level BPE
tokenizer (trained on tweets in a second, with RoBERTa's special tokens and no token_type_ids);
DeBERTa-v3 a real SentencePiece one, saved as its checkpoints ship it (spm.model and
tokenizer_config.json, no tokenizer.json: transformers converts it to a fast one on load); the
others use all-MiniLM-L6-v2's WordPiece vocabulary, under the family's own tokenizer class
where transformers has a WordPiece one (BERT, DistilBERT, ELECTRA), else BertTokenizerFast, which
their models accept: only token ids reach the graph.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

FAMILIES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "albert", "deberta-v2",
            "modernbert", "mpnet")
TASK_HEADS = {
    "text-classification": "ForSequenceClassification",
    "token-classification": "ForTokenClassification",
    "question-answering": "ForQuestionAnswering",
    "feature-extraction": "Model",
}
PREFIX = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta", "camembert": "Camembert",
          "distilbert": "DistilBert", "electra": "Electra", "albert": "Albert", "deberta-v2": "DebertaV2",
          "modernbert": "ModernBert", "mpnet": "MPNet"}
TOKEN_LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")


@lru_cache(maxsize=1)
def _byte_level_bpe():
    """A RoBERTa-style tokenizer: byte-level BPE with <s> ... </s>, trained on 3,000 tweets."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import RobertaTokenizerFast

    from pipeline.run.demo import read_tweets

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([t["text"] for t in read_tweets()[:3000]], vocab_size=2000, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe._tokenizer.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0))
    return RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                cls_token="<s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")


@lru_cache(maxsize=1)
def _sentencepiece():
    """DeBERTa-v3's tokenizer: a SentencePiece unigram model trained on 3,000 tweets, with its
    [CLS]/[SEP]/[PAD]/[UNK]/[MASK] pieces."""
    import io
    import tempfile

    import sentencepiece
    from transformers import DebertaV2Tokenizer

    from pipeline.run.demo import read_tweets

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([t["text"] for t in read_tweets()[:3000]]), model_writer=model, vocab_size=2000,
        model_type="unigram", pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]", bos_piece="[CLS]",
        eos_piece="[SEP]", unk_piece="[UNK]", user_defined_symbols=["[MASK]"], minloglevel=2)
    folder = Path(tempfile.mkdtemp(prefix="spm-"))
    (folder / "spm.model").write_bytes(model.getvalue())
    return DebertaV2Tokenizer(vocab_file=str(folder / "spm.model"))


def _config(family: str, layers: int, hidden: int, heads: int, intermediate: int, vocab: int, tokenizer):
    import transformers

    common = dict(vocab_size=vocab, max_position_embeddings=256)
    if family == "deberta-v2":  # DeBERTa-v3's configuration: relative attention both ways, shared keys, no types
        return transformers.DebertaV2Config(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate,
            relative_attention=True, position_buckets=32, pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
            share_att_key=True, position_biased_input=False, type_vocab_size=0, max_relative_positions=-1, **common)
    if family == "modernbert":  # a sliding window shorter than the test rows, so local attention is exercised
        return transformers.ModernBertConfig(
            hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate,
            local_attention=16, global_attn_every_n_layers=2, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
            cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id, **common)
    if family == "distilbert":
        return transformers.DistilBertConfig(dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=intermediate,
                                             **common)
    sizes = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                 intermediate_size=intermediate, **common)
    if family == "electra":
        return transformers.ElectraConfig(embedding_size=hidden // 2, **sizes)
    if family == "albert":
        return transformers.AlbertConfig(embedding_size=hidden // 2, **sizes)
    cls = getattr(transformers, f"{PREFIX[family]}Config")
    return cls(**sizes)


HEAD_MODULES = ("classifier", "qa_outputs")


def make_model(folder: Path, family: str = "bert", task: str = "text-classification", layers: int = 2,
               hidden: int = 64, heads: int = 4, intermediate: int = 128, seed: int = 0,
               head_scale: float = 1.0) -> Path:
    """Save a random-weight `family` model for `task`, with a tokenizer, in `folder`.

    `head_scale` multiplies the output head's weights: a random head gives near-tied logits, and
    then any rounding flips a prediction, which says nothing about a quantizer."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    from pipeline.run.demo import minilm_dir

    if family == "roberta":
        tokenizer = _byte_level_bpe()
    elif family == "deberta-v2":
        tokenizer = _sentencepiece()
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
    config = _config(family, layers, hidden, heads, intermediate, len(tokenizer), tokenizer)
    if task == "token-classification":
        config.id2label = dict(enumerate(TOKEN_LABELS))
        config.label2id = {name: i for i, name in enumerate(TOKEN_LABELS)}
    elif task == "text-classification":
        config.id2label = {0: "negative", 1: "neutral", 2: "positive"}
        config.label2id = {name: i for i, name in config.id2label.items()}
    torch.manual_seed(seed)
    model = getattr(transformers, f"{PREFIX[family]}{TASK_HEADS[task]}")(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.add_(torch.randn_like(param) * 0.02)  # no zero biases, no equal tensors
            if name.startswith(HEAD_MODULES):
                param.mul_(head_scale)
    model.save_pretrained(str(folder))
    if family in ("distilbert", "electra"):
        cls = getattr(transformers, f"{PREFIX[family]}TokenizerFast")
        tokenizer = cls(vocab_file=str(minilm_dir() / "vocab.txt"))
    tokenizer.save_pretrained(str(folder))
    return Path(folder)


def reference_pruned_export(folder: Path, out_dir: Path, heads: dict[int, list[int]], opset: int = 17) -> Path:
    """PyTorch's `prune_heads` on the classifier in `folder`, saved and freshly exported: the
    independent reference every ONNX head-removal test compares against."""
    import shutil

    import transformers

    from pipeline.stages.export import export_onnx

    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    model.prune_heads(heads)
    model.save_pretrained(str(out_dir / "pt"))
    for item in Path(folder).iterdir():
        if "token" in item.name or item.name == "vocab.txt":
            shutil.copy(item, out_dir / "pt" / item.name)
    export_onnx(out_dir / "pt", out_dir / "reference.onnx", opset, "text-classification")
    return out_dir / "reference.onnx"
