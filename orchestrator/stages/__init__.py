"""One module per stage, each a `orchestrator.stage.Stage`: its task, plan, worker and hook."""
