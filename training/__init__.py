"""LoRA fine-tuning that emits adapters the Quiver server loads as they are.

`quiver train` (and `python -m training`) trains one adapter from chat or text JSONL;
`training.jobs.JobManager` runs such trainings in child processes for the server's
fine-tuning API. Importing this package is cheap: torch, transformers and peft are
imported only by the modules that train.
"""
