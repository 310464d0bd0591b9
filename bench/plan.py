"""How much each run measures: the full run's counts and the smoke run's tiny ones."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    mode: str
    max_run_s: int  # the whole run, start-up and clean-up included
    sequential_requests: int
    sequential_warmup: int
    paused_requests: int  # sequential again, with a pause before each call
    pause_s: float
    load_s: float
    use_wrk: bool
    sse_paced_streams: int
    sse_burst_streams: int
    sse_cpu_streams: int  # back-to-back streams per target, for CPU per stream
    storm_size: int
    storm_rounds: int
    open_connections: int
    settle_s: float  # pause before each memory reading
    redis_calls: int
    redis_users: int
    profile_s: float


FULL = Plan(
    mode="full",
    max_run_s=900,
    sequential_requests=3000,
    sequential_warmup=300,
    paused_requests=400,
    pause_s=0.005,
    load_s=5.0,
    use_wrk=True,
    sse_paced_streams=20,
    sse_burst_streams=30,
    sse_cpu_streams=100,
    storm_size=300,
    storm_rounds=8,
    open_connections=1000,
    settle_s=0.5,
    redis_calls=2000,
    redis_users=5000,
    profile_s=8.0,
)
SMOKE = Plan(
    mode="smoke",
    max_run_s=120,
    sequential_requests=30,
    sequential_warmup=5,
    paused_requests=10,
    pause_s=0.005,
    load_s=0.3,
    use_wrk=False,  # wrk's shortest run is a second per target and level: too slow here
    sse_paced_streams=2,
    sse_burst_streams=2,
    sse_cpu_streams=3,
    storm_size=20,
    storm_rounds=1,
    open_connections=20,
    settle_s=0.1,
    redis_calls=20,
    redis_users=50,
    profile_s=0.0,
)
