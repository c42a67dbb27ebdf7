"""The routes the `seekrai` SDK calls (`/v1/flow/...`, `/v1/inference/chat/completions`), as views over
Quiver's jobs, files, adapters and store; its chat renders the OpenAI chat pipeline in the SDK's shape."""
