"""LLMBoost chains served as one OpenAI model: one Ray actor per member, pipelined through a Ray Compiled Graph.

A chain directory (``ftray boost`` / ``ftray train llmboost``; `ftray.methods.llmboost.model`) is served by a
`BoostEngine` replica that owns one `BoostMember` actor per member. Each actor loads the chain but keeps only
its member (the shared base with that member's LoRA and its CMA blocks) and its own KV caches, and gets its
own CPUs (`member_num_cpus`, that many torch threads), so on a 2-core machine the two members of a chain run
on a core each.

Dataflow of one step (prefill: the prompt's T positions; decode: one position), with S = {s_1 < … < s_k}:

    member m, segment j:  h ← layers s_{j-1}+1 … s_j of member m      (needs only its own segment j−1)
                          h ← CMA_{s_j}(h, state of member m−1 at s_j)  (m ≥ 1; the state it hands on)
    tail (last member):   layers s_k+1 … L, final norm, LM head at the last position

`pipeline: true` binds every segment and every CMA as its own node of a Ray Compiled Graph (`ray.dag`
`InputNode` / `bind` / `experimental_compile`; on CPU its channels are shared-memory buffers that resize
themselves). Member m's layers of segment j depend only on its own segment j−1, so they run while member
m−1 runs its segment j; only the CMA waits for m−1's state. Member m therefore finishes about one CMA and
one hop after member m−1, and a step costs one member's forward plus (M−1)·(CMA + hop), not M forwards.
Members that are not the last skip their tail (layers after s_k and the LM head): nobody reads it.
`pipeline: false` compiles the same actors into one node per member (`whole`): member m starts when member
m−1 has finished its whole forward and hands over all its states at once (the spec's "batched per step"
form). Both modes run the same per-segment code on the same actors, so they give identical tokens.

Why Compiled Graphs: the issue measured on this machine (Ray 2.60, CPU, p50 per hop) 0.38 ms for a
[1, 576] hidden state and 0.65 ms for [1, 49152] logits through a Compiled Graph, 1.6 / 3.8 ms through a
plain actor call and 4.0 / 6.7 ms deployment to deployment through Serve. A SmolLM2 step with S = every
4th layer hands on 7 states per member, so plain actor calls would add ~11 ms to a ~50 ms token and Serve
handles ~28 ms; the graph adds ~3 ms. Serve handles also have no sticky sessions for per-sequence KV
caches. A Serve deployment per member would thus lose the pipeline's gain, so the replica owns its members
as actors (as `serving.fusion` does) and the members' deployments are these actors. `ftray bench boost`
measures the result (docs/llmboost.md, "Serving").

Members run on CPU: the graph's channels are shared-memory buffers; GPU members would need the graph's torch
tensor transport (NCCL) and are not supported yet.

Batching: the replica decodes static batches gathered by `@serve.batch` (`TextEngine`), one session (one
KV cache per member) per batch, left-padded like `serving.generation.BatchDecoder`; greedy tokens equal the
chain model's own `generate()` (tests/serving/test_boost_serving.py).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import ray
import torch
from ray import serve

from serving.config import BoostEnsembleConfig, ServeConfigError, check_chain_dir
from serving.engine import TextEngine
from serving.generation import Event, Job, decode_batch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GET_TIMEOUT_S = 600  # a prefill on a busy CPU can take far longer than Compiled Graphs' 10 s default


@ray.remote
class BoostMember:
    """One chain member (0-based `member`): its decoder layers split into segments at S, its CMA blocks, its caches.

    Session ops arrive as a dict through the graph's input: {"op": "start", "session", "prompts", "pad"},
    {"op": "step", "session", "tokens"} or {"op": "end", "session"}; an "end" passes None down every node.
    """

    def __init__(self, path: str, member: int, dtype: str = "float32", num_threads: int = 1, head: bool = False):
        torch.set_num_threads(max(1, num_threads))
        from ftray.methods.llmboost.model import LlmBoostForCausalLM
        from ftray.models import default_autocast_dtype

        chain = LlmBoostForCausalLM.from_pretrained(path, members=member + 1)
        if dtype in _DTYPES:
            chain = chain.to(_DTYPES[dtype])
        self.autocast = default_autocast_dtype("cpu") if dtype == "auto" else None
        self.member, self.head = member, head
        self.lm = chain.members[member].eval()  # the base's weights (shared) + this member's LoRA
        self.blocks = chain.cma[member].eval()
        self.layers = list(chain.config.layers)
        self.decoder = self.lm.base_model
        for layer in self.decoder.layers:
            layer._forward_hooks.clear()  # the chain's CMA hooks: this actor calls the blocks itself, per segment
        self.bounds = [0, *self.layers]  # segment j runs decoder layers bounds[j] … bounds[j+1]−1 (0-based)
        self.info_ = {"context": getattr(self.lm.config, "max_position_embeddings", None) or 2048,
                      "vocab": self.lm.config.vocab_size, "layers": self.layers, "n_members": chain.n_members,
                      "ensemble": chain.config.ensemble, "beta": chain.config.beta,
                      "eos": getattr(chain.generation_config, "eos_token_id", None)}
        del chain  # the other members' LoRA and CMA weights go with it
        self.sessions: dict[str, dict] = {}
        self.run: dict | None = None  # the step in flight: its masks, rotary embeddings and cache

    def info(self) -> dict:
        """S, member count, ensemble, vocabulary, context length and eos of the chain (called before compiling)."""
        return self.info_

    def ready(self) -> bool:
        """True once loaded (to wait for every member before compiling a graph)."""
        return True

    def _ctx(self):
        autocast = torch.autocast("cpu", dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        stack.enter_context(autocast)
        return stack

    def begin(self, inp: dict) -> torch.Tensor | None:
        """Open the step `inp` asks for and run segment 0's layers; returns member's state before its first CMA."""
        from ftray.methods.llmboost.model import MemberCache
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer
        from transformers.masking_utils import create_causal_mask

        if inp["op"] == "end":
            self.sessions.pop(inp["session"], None)
            self.run = None
            return None
        if inp["op"] == "start":
            prompts, pad = inp["prompts"], inp["pad"]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), pad, dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for row, prompt in enumerate(prompts):
                ids[row, width - len(prompt):] = torch.tensor(prompt)
                mask[row, width - len(prompt):] = 1
            # Positions count real tokens only, as BatchDecoder's: a left-padded row decodes as it would alone.
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = MemberCache(DynamicCache(config=self.lm.config), [DynamicLayer() for _ in self.blocks])
            session = self.sessions[inp["session"]] = {"mask": mask, "positions": positions, "cache": cache}
        else:
            session = self.sessions[inp["session"]]
            ids = torch.tensor(inp["tokens"], dtype=torch.long)[:, None]
            session["positions"] = session["positions"][:, -1:] + 1
            session["mask"] = torch.cat([session["mask"], torch.ones_like(ids)], dim=-1)
        with self._ctx():
            h = self.decoder.embed_tokens(ids)
            positions, cache = session["positions"], session["cache"]
            # What LlamaModel.forward does before its layers (transformers 5.x), kept for the segments.
            mask4d = create_causal_mask(config=self.lm.config, inputs_embeds=h, attention_mask=session["mask"],
                                        past_key_values=cache.lm, position_ids=positions)
            self.run = {"mask": session["mask"], "mask4d": mask4d, "positions": positions, "cache": cache,
                        "rope": self.decoder.rotary_emb(h, position_ids=positions)}
            return self._layers(0, h)

    def _layers(self, j: int, h: torch.Tensor, end: int | None = None) -> torch.Tensor:
        run = self.run
        stop = self.bounds[j + 1] if end is None else end
        for layer in self.decoder.layers[self.bounds[j]:stop]:
            h = layer(h, attention_mask=run["mask4d"], position_embeddings=run["rope"], position_ids=run["positions"],
                      past_key_values=run["cache"].lm, use_cache=True)
        return h

    def segment(self, j: int, h: torch.Tensor | None) -> torch.Tensor | None:
        """Segment j ≥ 1's decoder layers (s_{j}+1 … s_{j+1}, 1-based) on member's own state after segment j−1."""
        if h is None:
            return None
        with self._ctx():
            return self._layers(j, h)

    def fuse(self, j: int, h: torch.Tensor | None, prev: torch.Tensor | None) -> torch.Tensor | None:
        """The CMA block at s_{j+1}: member's state h reads member m−1's state `prev` there (K/V cached per session)."""
        if h is None:
            return None
        run, block = self.run, self.blocks[str(self.layers[j])]
        with self._ctx():
            k, v = block.kv(prev.to(h.dtype))
            k, v = run["cache"].cma[j].update(k, v)
            return block(h, k, v, run["mask"])

    def tail(self, h: torch.Tensor | None) -> torch.Tensor | None:
        """The layers after s_k, the final norm and the LM head at the last position: fp32 logits [B, V]."""
        if h is None:
            return None
        with self._ctx():
            h = self._layers(len(self.layers), h, end=len(self.decoder.layers))
            logits = self.lm.lm_head(self.decoder.norm(h[:, -1:]))
        self.run = None
        return logits[:, -1].float()

    def advance(self, j: int, h: torch.Tensor | None, prev: torch.Tensor | None) -> torch.Tensor | None:
        """The last member's fuse at s_{j+1} and what follows it up to the next CMA (or the tail): one node, as
        nobody reads the last member's states."""
        h = self.fuse(j, h, prev)
        if j + 1 < len(self.layers):
            return self.segment(j + 1, h)
        return self.tail(h) if self.head else h

    def whole(self, inp: dict, prev: dict | None) -> dict | None:
        """Member's whole step after member m−1's whole step (`pipeline: false`): its states at S, and logits if it has a head."""
        h = self.begin(inp)
        if h is None:
            return None
        states = []
        for j in range(len(self.layers)):
            if j:
                h = self.segment(j, h)
            if self.member:
                h = self.fuse(j, h, prev["states"][j])
            states.append(h)
        logits = self.tail(h) if self.head else None
        self.run = None
        return {"states": states, "logits": logits, "prev_logits": None if prev is None else prev["logits"]}


def heads(n_members: int, ensemble: str) -> list[bool]:
    """Which members compute logits: the last one, and the one before it for the additive ensemble."""
    need = {n_members - 1} | ({n_members - 2} if ensemble == "additive" and n_members > 1 else set())
    return [m in need for m in range(n_members)]


def start_members(path: str, n_members: int, ensemble: str, dtype: str, num_cpus: float, threads: int) -> list:
    """One `BoostMember` actor per member, each with `num_cpus` CPUs and `threads` torch threads."""
    actors = [BoostMember.options(num_cpus=num_cpus).remote(path, m, dtype, threads, head)
              for m, head in enumerate(heads(n_members, ensemble))]
    ray.get([a.ready.remote() for a in actors])
    return actors


def compile_chain(actors: list, n_layers_in_s: int, pipeline: bool, ensemble: str = "last"):
    """The Compiled Graph of one step over `actors`: per-segment nodes (pipeline) or one node per member."""
    from ray.dag import InputNode, MultiOutputNode

    need = heads(len(actors), ensemble)
    with InputNode() as inp:
        if not pipeline:
            node = None
            for actor in actors:
                node = actor.whole.bind(inp, node)
            out = node
        else:
            prev, tails, last = None, [], len(actors) - 1
            for m, actor in enumerate(actors[:last]):
                h, states = actor.begin.bind(inp), []
                for j in range(n_layers_in_s):
                    if j:
                        h = actor.segment.bind(j, h)
                    if m:
                        h = actor.fuse.bind(j, h, prev[j])
                    states.append(h)  # the state member m+1 waits for at s_{j+1}
                prev = states
                if need[m]:
                    tails.append(actor.tail.bind(h))
            h = actors[last].begin.bind(inp)
            if last == 0:
                tails.append(actors[last].tail.bind(h))
            for j in range(n_layers_in_s if last else 0):  # the last member hands nothing on: fuse + layers per node
                h = actors[last].advance.bind(j, h, prev[j])
            out = MultiOutputNode([*tails, h] if last else tails)
    return out.experimental_compile()


class ChainGraph:
    """A compiled step over a chain's member actors; `execute(inp)` returns the chain's logits [B, V] (or None)."""

    def __init__(self, actors: list, info: dict, pipeline: bool):
        self.pipeline, self.ensemble, self.beta = pipeline, info["ensemble"], info["beta"]
        self.dag = compile_chain(actors, len(info["layers"]), pipeline, info["ensemble"])
        # Reading a Compiled Graph's output busy-polls (measured: the waiting driver takes 84% of a core). On a
        # machine with one core per member that spinning steals the members' cores and the pipeline ran no faster
        # than `pipeline: false`. So steps are driven from one thread at the lowest priority (Linux nice values
        # are per thread): it still wakes at once when the output lands, but yields the cores to the members.
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="boost-graph", initializer=os.nice, initargs=(19,))

    def execute(self, inp: dict) -> torch.Tensor | None:
        """Run one step (start/step/end) through the graph."""
        out = self.reader.submit(lambda: ray.get(self.dag.execute(inp), timeout=GET_TIMEOUT_S)).result()
        if self.pipeline:
            logits, prev = out[-1], (out[0] if len(out) > 1 else None)
        elif out is None:
            return None
        else:
            logits, prev = out["logits"], out["prev_logits"]
        if logits is not None and self.ensemble == "additive" and prev is not None:
            logits = logits + self.beta * prev
        return logits

    def teardown(self) -> None:
        """Release the graph's channels (the actors stay)."""
        self.dag.teardown()
        self.reader.shutdown(wait=False)


class BoostDecoder:
    """A logits source for `decode_batch`: one session of a `ChainGraph` (prefill, then one token per step)."""

    def __init__(self, graph: ChainGraph, prompts: list[list[int]], pad_id: int):
        self.graph, self.prompts, self.pad_id = graph, prompts, pad_id
        self.session = uuid.uuid4().hex
        self.started = False

    def step(self, tokens: list[int] | None = None) -> torch.Tensor:
        """Prefill (first call) or feed one token per row; returns the chain's logits [B, V]."""
        if not self.started:
            self.started = True
            return self.graph.execute({"op": "start", "session": self.session, "prompts": self.prompts, "pad": self.pad_id})
        return self.graph.execute({"op": "step", "session": self.session, "tokens": tokens})

    def close(self) -> None:
        """Drop the session's caches in every member."""
        if self.started:
            self.graph.execute({"op": "end", "session": self.session})


@serve.deployment
class BoostEngine(TextEngine):
    """An LLMBoost replica: OpenAI requests decoded through its member actors' Compiled Graph."""

    def __init__(self, ensemble: dict):
        from ftray.eval.loading import load_checkpoint_tokenizer
        from ftray.methods.llmboost.model import LlmBoostConfig

        self.cfg = BoostEnsembleConfig.model_validate(ensemble)
        chain = LlmBoostConfig.from_pretrained(self.cfg.path)
        self.actors = start_members(self.cfg.path, chain.n_members, chain.ensemble, self.cfg.dtype,
                                    self.cfg.member_num_cpus, self.cfg.threads())
        info = ray.get(self.actors[-1].info.remote())
        self.graph = ChainGraph(self.actors, info, self.cfg.pipeline)
        self.tokenizer = load_checkpoint_tokenizer(self.cfg.path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        eos = info["eos"] if isinstance(info["eos"], list) else [info["eos"]]
        self.eos_ids = {i for i in [*eos, self.tokenizer.eos_token_id] if i is not None}
        self.context = info["context"]
        self.default_max_tokens = self.cfg.default_max_tokens
        self.configure_batching(self.cfg.max_batch_size, self.cfg.batch_wait_timeout_s)

    def steps(self, jobs: list[Job]) -> Iterator[list[Event | None]]:
        """Decode `jobs` as one batch through the chain; frees the members' caches at the end."""
        decoder = BoostDecoder(self.graph, [j.prompt_ids for j in jobs], self.tokenizer.pad_token_id)
        try:
            yield from decode_batch(None, self.tokenizer, jobs, self.eos_ids, self.tokenizer.pad_token_id, decoder=decoder)
        finally:
            decoder.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.graph.teardown()


def check_chain(cfg: BoostEnsembleConfig, index: int) -> None:
    """Refuse a path (alias, dir) that does not resolve to an LLMBoost chain directory, naming the field."""
    from pathlib import Path

    from ftray.models import resolve_model_path

    try:
        path = Path(resolve_model_path(cfg.path))
    except Exception as err:  # an unknown alias or a missing dir: the config's problem, name the field
        raise ServeConfigError(f"ensembles.{index}.path: cannot resolve {cfg.path!r}: {err}") from None
    check_chain_dir(path, f"ensembles.{index}.path")


def boost_deployment(cfg: BoostEnsembleConfig, index: int):
    """The Serve application node of one LLMBoost chain (the chain directory checked first)."""
    check_chain(cfg, index)
    # The replica only drives the graph; the member actors hold the CPUs.
    return BoostEngine.options(
        name=f"llmboost-{cfg.name}", num_replicas=cfg.num_replicas, max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
    ).bind(cfg.model_dump())
