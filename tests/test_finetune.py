"""python -m diloco.finetune: a tiny GPT-2 and a local BPE, fine-tuned full, LoRA and K=2."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from omegaconf import OmegaConf

from diloco import api
from diloco.build import EVAL_BATCH, loss_at
from diloco.compose import compose
from diloco.config import ConfigError, build_optimizer
from diloco.data import IGNORE_INDEX, DataError, ShardSampler, eval_batches
from diloco.finetune.config import LoraOptions
from diloco.finetune.models import CausalLM, load_saved, open_source
from diloco.finetune.run import prepare, run
from diloco.workers import WorkerGroup
from tests.helpers import OFFLINE, REPO

LETTERS = "abcdefghijklmnopqrstuvwxyz"
QUIET = ("logger.mode=disabled", "logger.progress=false", "workers.threads=1")
EXAMPLES = ("data.prompt_field=prompt", "data.response_field=response", "data.seq_len=16")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """A tiny GPT-2 with a BPE trained here (``hf/``) and prompt/response data (``user.jsonl``).

    The pattern: "after m comes" -> " n", for random letters; 200 examples.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("finetune")
    rng = random.Random(0)
    rows = []
    for _ in range(200):
        j = rng.randrange(25)
        rows.append({"prompt": f"after {LETTERS[j]} comes", "response": f" {LETTERS[j + 1]}"})
    (root / "user.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([r["prompt"] + r["response"] for r in rows], trainer=trainer)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tok),
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    return root


def args(assets: Path, *extra: str) -> list[str]:
    return [f"model.path={assets / 'hf'}", f"data.path={assets / 'user.jsonl'}", *QUIET, *extra]


def finetune(run_dir: Path, argv: list[str]) -> dict:
    return run(compose(argv, config_name="finetune"), run_dir, argv)


def corpus_of(argv: list[str]):
    node = compose(argv, config_name="finetune")
    return prepare(OmegaConf.to_container(node, resolve=True))[2]


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, corpus) -> float:
    """The trainer's eval loss (sequence-weighted mean of batch means) of ``model``."""
    model.eval()
    batches = eval_batches(corpus, EVAL_BATCH, 4)  # every eval sequence: at most 128
    total = sum(model(x, y)[1].item() * len(x) for x, y in batches)
    return total / sum(len(x) for x, _ in batches)


def hf_model(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, dtype=torch.float32
    )


def test_full_finetune_lowers_held_out_loss_and_reloads(assets, tmp_path):
    argv = args(assets, *EXAMPLES, "optimizer.lr=3e-3", "train.steps=60")
    summary = finetune(tmp_path, argv)
    before, after = summary["eval_loss_before"], summary["final_eval_loss"]
    assert after < before - 1.0, (before, after)
    assert json.loads((tmp_path / "summary.json").read_text())["eval_loss_before"] == before
    saved = tmp_path / "model"
    assert summary["saved"] == str(saved) and (saved / "model.safetensors").is_file()
    assert (saved / "tokenizer.json").is_file()
    model = hf_model(saved)
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    corpus = corpus_of(argv)
    # the reloaded model is the trained one, bit for bit: same computation, same loss
    assert held_out_loss(CausalLM(model), corpus) == pytest.approx(after, abs=1e-6)
    assert held_out_loss(CausalLM(hf_model(assets / "hf")), corpus) == pytest.approx(
        before, abs=1e-6
    )


def test_diloco_two_workers_full_and_lora_exchanging_only_the_adapter(assets, tmp_path):
    k2 = ("algorithm=diloco", "workers.count=2", "algorithm.inner_steps=10", "train.steps=40")
    full = finetune(tmp_path / "full", args(assets, *EXAMPLES, *k2, "optimizer.lr=3e-3"))
    lora_argv = args(assets, *EXAMPLES, *k2, "optimizer.lr=1e-2", "finetune.lora=true")
    lora = finetune(tmp_path / "lora", lora_argv)
    for s, fall in ((full, 1.0), (lora, 0.1)):  # LoRA on a random base model learns little
        assert s["algorithm"] == "diloco" and s["workers"] == 2 and s["rounds"] == 4
        assert s["final_eval_loss"] < s["eval_loss_before"] - fall, s
    # the exchanged parameters are the adapters: LoRA's A and B of both c_attn layers
    reference = peft.get_peft_model(hf_model(assets / "hf"), peft.LoraConfig(r=8, lora_alpha=16))
    adapters = sum(p.numel() for p in reference.parameters() if p.requires_grad)
    assert lora["params"] == adapters == 2 * 8 * (32 + 96)
    assert full["params"] == sum(p.numel() for p in hf_model(assets / "hf").parameters())
    assert lora["comm_bytes_per_worker"] > 0
    assert lora["comm_bytes_per_worker"] * full["params"] == pytest.approx(
        full["comm_bytes_per_worker"] * lora["params"]
    )  # bytes in proportion to the parameters sent
    # the adapter reloads onto the base model with peft and gives the run's loss
    adapter = tmp_path / "lora" / "adapter"
    assert lora["saved"] == str(adapter) and (adapter / "adapter_config.json").is_file()
    reloaded = peft.PeftModel.from_pretrained(hf_model(assets / "hf"), adapter)
    loss = held_out_loss(CausalLM(reloaded), corpus_of(lora_argv))
    assert loss == pytest.approx(lora["final_eval_loss"], abs=1e-6)


def test_demo_two_workers_fine_tune_through_the_same_trainer(assets, tmp_path):
    argv = args(
        assets,
        *EXAMPLES,
        "algorithm=demo",
        "workers.count=2",
        "train.steps=30",
        "optimizer.lr=3e-3",
    )
    s = finetune(tmp_path / "demo", argv)
    assert s["algorithm"] == "demo" and s["workers"] == 2 and s["steps"] == 30
    assert s["final_eval_loss"] < s["eval_loss_before"] - 1.0, s
    assert 0 < s["comm_bytes_per_worker"] < 30 * 4 * s["params"]  # compressed, every step
    assert (tmp_path / "demo" / "model" / "model.safetensors").is_file()


def test_lora_workers_share_one_frozen_base_and_hold_only_the_adapters(assets):
    model = open_source(str(assets / "hf")).load(LoraOptions(r=4), 0, torch.device("cpu"))
    base = dict(model.named_buffers(remove_duplicate=False))
    wte, head = (
        "model.base_model.model.transformer.wte.weight",
        "model.base_model.model.lm_head.weight",
    )
    assert base[wte] is base[head]  # GPT-2's tied embedding and head: one frozen tensor
    group = WorkerGroup(model, [0, 1, 2], build_optimizer({"_target_": "torch.optim.SGD"}, "o"))
    names = [n for n, _ in model.named_parameters()]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert group.num_params == group.params.shape[1] == 2 * 4 * (32 + 96)
    for replica in group.replicas:  # the copies share the base weights, never copy them
        theirs = dict(replica.named_buffers(remove_duplicate=False))
        assert all(theirs[n].data_ptr() == base[n].data_ptr() for n in model.shared)
        assert all(p.data_ptr() != base[wte].data_ptr() for p in replica.parameters())


def test_loss_counts_response_tokens_only(assets):
    corpus = corpus_of(args(assets, *EXAMPLES))
    tok = transformers.AutoTokenizer.from_pretrained(assets / "hf")
    eos = tok.eos_token_id
    assert corpus.train_labels is not None and corpus.eval_labels is not None
    assert corpus.train.shape == corpus.train_labels.shape == (len(corpus.train), 17)
    assert len(corpus.train) + len(corpus.eval) == 200 and len(corpus.eval) == 20
    for seq, labels in zip(corpus.train[:20], corpus.train_labels[:20], strict=True):
        text = tok.decode(seq.tolist())
        prompt = text[: text.index(" comes") + len(" comes")]
        n_prompt = len(tok(prompt)["input_ids"])
        assert (labels[:n_prompt] == IGNORE_INDEX).all()  # the prompt takes no loss
        kept = labels[labels != IGNORE_INDEX].tolist()
        assert tok.decode(kept[:-1]) == f" {LETTERS[LETTERS.index(prompt[6]) + 1]}"
        assert kept[-1] == eos  # the response ends with eos, which is learned too
        n_kept = n_prompt + len(kept)
        assert (labels[n_kept:] == IGNORE_INDEX).all() and (seq[n_kept:] == eos).all()  # padding
    # batches take their targets from the labels, inputs from the sequences
    x, y = ShardSampler(corpus.train, torch.arange(8), 8, 0, 0, corpus.train_labels).next_batch()
    for xb, yb in zip(x, y, strict=True):  # the rows come shuffled
        j = next(j for j in range(8) if torch.equal(corpus.train[j, :-1], xb))
        assert torch.equal(yb, corpus.train_labels[j, 1:])
    # the wrapper's loss is the mean over response targets, not over every position
    model = CausalLM(hf_model(assets / "hf")).eval()
    with torch.no_grad():
        logits, loss = model(x, y)
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        keep = y.flatten() != IGNORE_INDEX
        everything = F.cross_entropy(logits.flatten(0, 1), corpus.train[:8, 1:].flatten())
    assert 0 < keep.sum() < keep.numel() / 3
    assert loss.item() == pytest.approx(ce[keep].mean().item(), rel=1e-6)
    assert abs(loss.item() - everything.item()) > 1e-3
    # the validators' per-sequence scorer counts the same targets
    sgd = build_optimizer({"_target_": "torch.optim.SGD", "lr": 0.1}, "optimizer")
    group = WorkerGroup(model, [0], sgd)
    per_seq = loss_at(group)(group.global_param.data.clone(), (x, y))
    counted = (y != IGNORE_INDEX).sum(1)
    by_hand = (ce.view(y.shape) * (y != IGNORE_INDEX)).sum(1) / counted
    assert torch.allclose(per_seq, by_hand.double(), rtol=1e-5)


def test_plain_text_is_packed_with_eos_between_documents(assets, tmp_path):
    (tmp_path / "a.txt").write_text("after a comes b. " * 40)
    (tmp_path / "b.txt").write_text("after c comes d. " * 40)
    corpus = corpus_of([*args(assets), f"data.path={tmp_path}", "data.seq_len=16"])
    eos = transformers.AutoTokenizer.from_pretrained(assets / "hf").eos_token_id
    assert corpus.train_labels is None and corpus.train.shape[1] == 17
    stream = torch.cat([corpus.train, corpus.eval]).flatten()
    assert 1 <= int((stream == eos).sum()) <= 2  # one eos after each document (last cut off?)
    assert len(corpus.eval) == round(0.1 * (len(corpus.train) + len(corpus.eval)))


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        ("t5", "model_type 't5' is not a causal LM"),
        ("bert", "architectures ['BertForSequenceClassification'] are not causal LMs"),
        ("empty", "no config.json (not a Hugging Face model folder) and no .hydra/config.yaml"),
    ],
)
def test_not_a_causal_lm_is_a_one_line_error(assets, tmp_path, make, expected):
    folder = tmp_path / make
    folder.mkdir()
    if make == "t5":
        transformers.T5Config(d_model=8, num_layers=1, num_heads=1, d_kv=8).save_pretrained(folder)
    elif make == "bert":
        transformers.BertConfig(
            hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
            architectures=["BertForSequenceClassification"],
        ).save_pretrained(folder)  # fmt: skip
    with pytest.raises(ConfigError) as err:
        corpus_of([*args(assets, *EXAMPLES), f"model.path={folder}"])
    assert str(err.value).startswith(f"model.path={folder}: {expected}")
    assert "\n" not in str(err.value)


def test_missing_data_and_missing_field_are_one_line_errors(assets, tmp_path):
    with pytest.raises(DataError) as err:
        corpus_of([*args(assets, *EXAMPLES), f"data.path={tmp_path / 'none.jsonl'}"])
    assert str(err.value).startswith(f"data.path='{tmp_path / 'none.jsonl'}' does not exist")
    user = tmp_path / "user.jsonl"
    user.write_text(
        '{"question": "a", "answer": "b"}\n\n{"question": "c", "answer": "d"}\n'
        '{"question": "e", "reply": "f"}\n'
    )
    fields = ("data.prompt_field=question", "data.response_field=answer", "data.seq_len=16")
    with pytest.raises(DataError) as err:
        corpus_of([*args(assets, *fields), f"data.path={user}"])
    assert str(err.value) == (
        "data.response_field=answer: line 4 of user.jsonl has no field 'answer' "
        "(fields: question, reply)"
    )
    with pytest.raises(DataError, match=r"^data.text_field=text: line 1 of user.jsonl has no"):
        corpus_of([*args(assets, "data.seq_len=16"), f"data.path={user}"])


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "diloco.finetune", *argv],
        cwd=REPO, env={**os.environ, **OFFLINE},
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip


def test_cli_missing_folder_and_missing_field_exit_2_with_one_line(assets, tmp_path):
    nope, data = f"model.path={tmp_path / 'nope'}", f"data.path={assets / 'user.jsonl'}"
    out = cli(nope, data, f"hydra.run.dir={tmp_path / 'run0'}")
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [
        f"error: model.path={tmp_path / 'nope'}: does not exist; point it at a Hugging Face "
        "causal LM folder or a python -m diloco.train run dir"
    ]
    out = cli(*args(assets, "data.prompt_field=prompt", "data.response_field=answer"),
              "data.seq_len=16", f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [
        "error: data.response_field=answer: line 1 of user.jsonl has no field 'answer' "
        "(fields: prompt, response)"
    ]
    assert not (tmp_path / "run" / "summary.json").exists()


def test_finetune_our_own_run_dir(assets, tmp_path, corpus_dir):
    pretrain = api.train(
        "algorithm=ddp", "model.n_layer=1", "model.n_head=2", "model.n_embd=32",
        "data.seq_len=32", f"data.path={corpus_dir}", f"data.cache_dir={tmp_path / 'cache'}",
        "train.eval_sequences=8", "checkpoint.every=10", *QUIET,
        workers=1, steps=20, batch_size=4, dir=tmp_path / "pretrain", progress=False,
    )  # fmt: skip
    argv = [*args(assets, *EXAMPLES), f"model.path={pretrain.dir}", "data.seq_len=32"]
    summary = finetune(tmp_path / "ft", [*argv, "optimizer.lr=3e-3", "train.steps=40"])
    assert summary["model_kind"] == "diloco"
    assert summary["final_eval_loss"] < summary["eval_loss_before"] - 1.0, summary
    saved = tmp_path / "ft" / "model"
    assert summary["saved"] == str(saved) and (saved / "model.safetensors").is_file()
    model = load_saved(saved)
    assert model.lm_head.weight is model.tok_emb.weight  # the tied head came back tied
    corpus = corpus_of(argv)  # the run's byte tokenizer
    assert corpus.vocab_size == 256
    assert held_out_loss(model, corpus) == pytest.approx(summary["final_eval_loss"], abs=1e-6)
    with pytest.raises(ConfigError, match=r"^model.path=.*: a model that diloco.finetune saved"):
        corpus_of([*argv, f"model.path={saved}"])
