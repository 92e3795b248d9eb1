"""Stand-ins for the outside world gpuproxy rents from: a local GPU marketplace whose machines
are real local processes serving an OpenAI-compatible API. The `sim` provider uses it; tests
and benchmarks call its servers directly."""
