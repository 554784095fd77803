"""The runner: run configs, datasets, the pipelined run, the run folder's schema, reports and the
`editstack` command. Built on `editstack.wire`; imports nothing from `editstack.service`.

Imports nothing at package level: the services' images install editstack without the runner's
extras (yaml, tqdm), and their healthchecks run `editstack ping` from `editstack.runner.cli`."""
