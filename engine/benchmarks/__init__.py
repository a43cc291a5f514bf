"""`fastllava bench`: benchmarks people run on their own machines (README "Benchmarks").

    record.py    provenance (machine, GPU, commit, date, versions, command) and the results folder
    stats.py     percentiles and the per-request latency summary (TTFT / ITL / e2e, goodput)
    plots.py     PNG figures (matplotlib, the `bench` extra)
    workload.py  images, prompts, max_tokens and arrival times of a serving workload
    clients.py   async HTTP drivers: OpenAI chat (SSE) and fal (stream / sync / queue)
    serve.py     `bench serve`: any server, fixed concurrency or Poisson rate, sweeps
    offline.py   `bench latency` / `bench throughput`: the engine in-process, random weights
    engines.py   the engines they drive: the runtime over random weights, or the Python API
    peers.py     transformers beside them: eager and compiled static cache, same weights
    roofline.py  copy / matmul ceilings measured in the run, the floors figures are rated against
    kernels.py   `bench kernels`: wraps the kernel benchmark of a source checkout
    cli.py       the subcommand group and `bench suite`
"""
