"""The generation engine on tiny real models: same tokens as the library's own generate, batching, sampling
seeds, cancellation, stop strings, the cache, and what happens when the generation thread dies."""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import pytest
import torch

from inference.engine.cache import KVCache
from inference.engine.engine import Engine, Failed, Finished, GenerationRequest, TextChunk
from inference.engine.lean import LeanDecoder
from inference.engine.loader import LlamaCppOptions, LoadedModel, load_model
from inference.engine.quant import Dense
from inference.engine.sampling import SamplingParams
from inference.engine.text import IncrementalDetokenizer, StopMatcher

PROMPTS = [
    "What is your name?",
    "Hello",
    "Orders ship within two days. When do refunds arrive, and how long does it take to get my money back?",
    "Two plus two is",
]


class CollectSink:
    def __init__(self) -> None:
        self.events: list[TextChunk | Finished | Failed] = []
        self.done = threading.Event()
        self.first = threading.Event()

    def put(self, event: TextChunk | Finished | Failed) -> None:
        self.events.append(event)
        self.first.set()
        if not isinstance(event, TextChunk):
            self.done.set()

    def wait(self, timeout: float = 60.0) -> CollectSink:
        assert self.done.wait(timeout), "no answer"
        return self

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TextChunk))

    @property
    def last(self) -> TextChunk | Finished | Failed:
        return self.events[-1]


def _submit(engine: Engine, ids: list[int], params: SamplingParams) -> CollectSink:
    sink = CollectSink()
    engine.submit(GenerationRequest(ids, params, sink))
    return sink


def _reference_text(folder: Path, model: LoadedModel, ids: list[int], max_new_tokens: int) -> str:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    out = hf.generate(
        torch.tensor([ids]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=model.pad_id,
        eos_token_id=sorted(model.stop_token_ids),
    )[0, len(ids) :].tolist()
    kept = [t for t in out if t not in model.stop_token_ids]
    return str(model.tokenizer.decode(kept, skip_special_tokens=True))


def llamacpp_options(cache_dir: Path, *, max_sequences: int = 8, context: int = 1024) -> LlamaCppOptions:
    return LlamaCppOptions(
        cache_dir=cache_dir, max_sequences=max_sequences, context_per_sequence=context, threads=1, batch_tokens=512
    )


@pytest.fixture
def engine_for(tiny_models: dict[str, Path], tmp_path: Path):  # type: ignore[no-untyped-def]
    engines: list[Engine] = []

    def make(
        name: str = "tiny-llama", *, backend: str = "auto", max_batch_size: int = 8, prefill_chunk: int = 256
    ) -> Engine:
        native = llamacpp_options(tmp_path / "gguf", max_sequences=max_batch_size) if backend == "llamacpp" else None
        model = load_model(name, tiny_models[name], backend_setting=backend, llamacpp=native)
        engine = Engine(model, max_batch_size=max_batch_size, prefill_chunk=prefill_chunk).start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


@pytest.mark.parametrize(
    ("name", "backend"),
    [
        ("tiny-llama", "lean"),
        ("tiny-qwen2", "lean"),
        ("tiny-qwen2", "reference"),
        pytest.param("tiny-llama", "llamacpp", marks=pytest.mark.native),
        pytest.param("tiny-qwen2", "llamacpp", marks=pytest.mark.native),
    ],
)
def test_greedy_answers_match_the_library_generate_even_when_batched(engine_for, tiny_models, name, backend):  # type: ignore[no-untyped-def]
    engine = engine_for(name, backend=backend)
    model = engine.model
    assert model.backend == backend
    prompts = [model.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    # All at once: prompts of different lengths share a left-padded batch and rows leave as they finish.
    sinks = [_submit(engine, ids, SamplingParams(max_new_tokens=24)) for ids in prompts]
    for ids, sink in zip(prompts, sinks, strict=True):
        sink.wait()
        assert isinstance(sink.last, Finished)
        assert sink.text == _reference_text(tiny_models[name], model, ids, 24)


@pytest.mark.parametrize("backend", ["lean", pytest.param("llamacpp", marks=pytest.mark.native)])
def test_requests_arriving_while_a_batch_runs_join_it(engine_for, backend):  # type: ignore[no-untyped-def]
    engine = engine_for(backend=backend)
    model = engine.model
    ids = [model.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    params = SamplingParams(max_new_tokens=200, ignore_eos=True)
    solo = [_submit(engine, i, params).wait().text for i in ids]
    first = _submit(engine, ids[0], params)
    assert first.first.wait(30)
    # The first request is decoding; these arrive mid-generation and must join its batch.
    others = [_submit(engine, i, params) for i in ids[1:]]
    texts = [s.wait().text for s in [first, *others]]
    assert engine.max_batch_seen > 1
    assert texts == solo  # joining a batch changes nothing in a greedy answer


class OrderedSink(CollectSink):
    """Records each event in one timeline shared by several sinks."""

    def __init__(self, name: str, timeline: list[str]) -> None:
        super().__init__()
        self.name, self.timeline = name, timeline

    def put(self, event: TextChunk | Finished | Failed) -> None:
        self.timeline.append(self.name)
        super().put(event)


@pytest.mark.parametrize("backend", ["lean", "reference", pytest.param("llamacpp", marks=pytest.mark.native)])
def test_a_long_prompt_is_read_in_chunks_while_running_streams_go_on(engine_for, tiny_models, backend):  # type: ignore[no-untyped-def]
    chunk = 8
    answers: dict[int, str] = {}
    streamed_meanwhile: dict[int, int] = {}
    for prefill_chunk in (chunk, 0):
        engine = engine_for(backend=backend, prefill_chunk=prefill_chunk)
        model = engine.model
        long_ids = model.encode_chat([{"role": "user", "content": " ".join(PROMPTS * 3)}])
        timeline: list[str] = []
        running = OrderedSink("running", timeline)
        short_ids = model.encode_chat([{"role": "user", "content": PROMPTS[1]}])
        engine.submit(GenerationRequest(short_ids, SamplingParams(max_new_tokens=400, ignore_eos=True), running))
        assert running.first.wait(30)
        long = OrderedSink("long", timeline)
        timeline.append("submitted")
        engine.submit(GenerationRequest(long_ids, SamplingParams(max_new_tokens=12), long))
        long.wait()
        running.wait()
        after = timeline[timeline.index("submitted") :]
        streamed_meanwhile[prefill_chunk] = after[: after.index("long")].count("running")
        answers[prefill_chunk] = long.text
    chunks = -(-len(long_ids) // chunk)
    assert chunks >= 20
    # Chunked: the running stream got a token after (nearly) every chunk. Whole: one step read the prompt, so only
    # the steps between the submission and the engine taking it (a handful at most, on a busy machine) streamed.
    assert streamed_meanwhile[chunk] >= chunks - 1, streamed_meanwhile
    assert streamed_meanwhile[0] < chunks // 2, streamed_meanwhile
    # Reading a prompt in pieces changes nothing in its greedy answer.
    assert answers[chunk] == answers[0] == _reference_text(tiny_models["tiny-llama"], model, long_ids, 12)


def test_a_seeded_sample_is_the_same_alone_and_in_a_batch(engine_for):  # type: ignore[no-untyped-def]
    engine = engine_for()
    model = engine.model
    ids = model.encode_chat([{"role": "user", "content": "Tell me a story"}])
    params = SamplingParams(max_new_tokens=40, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = _submit(engine, ids, params).wait().text
    crowd = [
        _submit(engine, ids, SamplingParams(max_new_tokens=40, temperature=1.0, ignore_eos=True)) for _ in range(3)
    ]
    again = _submit(engine, ids, params)
    assert again.wait().text == alone
    for sink in crowd:
        sink.wait()
    other_seed = _submit(engine, ids, SamplingParams(max_new_tokens=40, temperature=1.0, seed=99, ignore_eos=True))
    assert other_seed.wait().text != alone


def test_penalties_and_limits_shape_the_answer(engine_for):  # type: ignore[no-untyped-def]
    engine = engine_for()
    ids = engine.model.encode_chat([{"role": "user", "content": "Hello"}])
    plain = _submit(engine, ids, SamplingParams(max_new_tokens=30, ignore_eos=True)).wait()
    penalised = _submit(
        engine, ids, SamplingParams(max_new_tokens=30, repetition_penalty=1.8, frequency_penalty=1.0, ignore_eos=True)
    ).wait()
    assert isinstance(plain.last, Finished) and plain.last.reason == "length"
    assert plain.last.completion_tokens == 30
    assert penalised.text != plain.text


def test_a_cancelled_request_leaves_the_batch(engine_for):  # type: ignore[no-untyped-def]
    engine = engine_for()
    ids = engine.model.encode_chat([{"role": "user", "content": "Hello"}])
    sink = CollectSink()
    request = GenerationRequest(ids, SamplingParams(max_new_tokens=900, ignore_eos=True), sink)
    engine.submit(request)
    assert sink.first.wait(30)
    request.cancel()
    sink.wait()
    assert isinstance(sink.last, Finished)
    assert sink.last.reason == "cancelled"
    assert sink.last.completion_tokens < 900
    assert engine.running == 0


def test_stop_strings_end_the_text_before_them(engine_for):  # type: ignore[no-untyped-def]
    engine = engine_for()
    ids = engine.model.encode_chat([{"role": "user", "content": "Hello"}])
    full = _submit(engine, ids, SamplingParams(max_new_tokens=40, ignore_eos=True)).wait().text
    assert len(full) > 6
    stop = full[3:6]
    cut = _submit(engine, ids, SamplingParams(max_new_tokens=40, stop=(stop,), ignore_eos=True)).wait()
    assert isinstance(cut.last, Finished) and cut.last.reason == "stop"
    assert cut.text == full[: full.index(stop)]


def test_stop_matcher_holds_back_a_possible_stop_string() -> None:
    matcher = StopMatcher(["</end>"])
    assert matcher.feed("Hello </e") == "Hello "
    assert matcher.feed("nd> more") == ""
    assert matcher.stopped
    matcher = StopMatcher(["</end>"])
    assert matcher.feed("a </e") == "a "
    assert matcher.feed("x") == "</ex"
    assert matcher.flush() == ""
    matcher = StopMatcher(["##"])
    assert matcher.feed("tail #") == "tail "
    assert matcher.flush() == "#"


def test_detokenizer_never_splits_a_character(engine_for):  # type: ignore[no-untyped-def]
    tokenizer = engine_for().model.tokenizer
    text = "café ☕ 你好, shells!"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = IncrementalDetokenizer(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in piece for piece in pieces)


def test_cache_rows_join_and_leave_aligned_on_the_right() -> None:
    cache = KVCache.empty(1, 1, 1, 2, 4, dtype=torch.float32, device=torch.device("cpu"))
    cache.keys[0][0, 0, :3] = torch.tensor([[1.0, 1], [2, 2], [3, 3]])
    cache.mask[0, :3] = True
    cache.positions[:] = 3
    cache.length = 3
    longer = KVCache.empty(1, 1, 1, 2, 8, dtype=torch.float32, device=torch.device("cpu"))
    longer.keys[0][0, 0, :5] = 7.0
    longer.mask[0, :5] = True
    longer.positions[:] = 5
    longer.length = 5
    cache.extend(longer)  # the running row moves right by two columns
    assert cache.length == 5
    assert cache.mask[:, :5].tolist() == [[False, False, True, True, True], [True] * 5]
    assert cache.keys[0][0, 0, 2:5, 0].tolist() == [1.0, 2.0, 3.0]
    cache.select([0])  # the long row leaves: the padding columns nobody uses any more go too
    assert cache.length == 3
    assert cache.mask[:, :3].tolist() == [[True, True, True]]
    assert cache.keys[0][0, 0, :3, 0].tolist() == [1.0, 2.0, 3.0]


class InjectedFault(BaseException):
    """Raised inside the generation thread to kill it the way an unexpected fault would."""


def kill_thread(ident: int) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(InjectedFault))


def test_a_dead_generation_thread_fails_its_requests_and_refuses_new_ones(engine_for):  # type: ignore[no-untyped-def]
    from inference.engine.engine import EngineUnavailable

    engine = engine_for()
    ids = engine.model.encode_chat([{"role": "user", "content": "Hello"}])
    sink = _submit(engine, ids, SamplingParams(max_new_tokens=900, ignore_eos=True))
    assert sink.first.wait(30)
    assert engine.thread_ident is not None
    kill_thread(engine.thread_ident)
    sink.wait()
    assert isinstance(sink.last, Failed)
    assert not engine.alive and not engine.healthy
    assert engine.death and "InjectedFault" in engine.death
    with pytest.raises(EngineUnavailable):
        engine.submit(GenerationRequest(ids, SamplingParams(max_new_tokens=4), CollectSink()))


def test_extreme_sampling_settings_never_fail_a_shared_batch(engine_for):  # type: ignore[no-untyped-def]
    engine = engine_for()
    ids = engine.model.encode_chat([{"role": "user", "content": "Hello"}])
    extreme = [
        SamplingParams(max_new_tokens=8, temperature=2.0, top_p=1e-300, repetition_penalty=0.01, ignore_eos=True),
        SamplingParams(max_new_tokens=8, temperature=1e-300, frequency_penalty=2.0, presence_penalty=-2.0),
        SamplingParams(max_new_tokens=8, temperature=2.0, top_k=1, repetition_penalty=10.0, seed=1),
    ]
    plain = _submit(engine, ids, SamplingParams(max_new_tokens=8, ignore_eos=True))
    sinks = [_submit(engine, ids, params) for params in extreme]
    for sink in [plain, *sinks]:
        assert isinstance(sink.wait().last, Finished)
    assert engine.healthy


def test_models_loaded_at_the_same_time_are_all_whole(tiny_models):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    # A deployment loads in the background while a request loads another model on demand; the library's loader
    # is not thread-safe on its own, and an unguarded race leaves tied weights on the meta device.
    loaded: list[LoadedModel] = []
    errors: list[BaseException] = []

    def load(name: str) -> None:
        try:
            loaded.append(load_model(name, tiny_models[name]))
        except BaseException as exc:  # collected so the test reports it instead of a silent thread death
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(name,)) for name in ("tiny-llama", "tiny-qwen2") * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(loaded) == 6
    for model in loaded:
        decoder = model.decoder
        assert isinstance(decoder, LeanDecoder)
        reference = AutoModelForCausalLM.from_pretrained(model.folder)
        # Whole means every tensor holds the checkpoint's values, the tied output head included.
        assert isinstance(decoder.lm_head, Dense)
        (head,) = decoder.lm_head.weights
        assert not head.is_meta
        assert torch.equal(head, reference.lm_head.weight.detach())
        assert torch.equal(decoder.embed, reference.get_input_embeddings().weight.detach())
