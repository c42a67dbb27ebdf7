"""The OpenAI fine-tuning surface (`/v1/files`, `/v1/fine_tuning/jobs`) and the bridge from jobs to adapters."""
