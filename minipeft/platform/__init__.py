"""A local fine-tuning platform with the cloud's API shape (the outline's section 6, the Bailian
flow): upload JSONL -> create a fine-tune job on a base model -> set hyper-parameters -> train ->
evaluate -> deploy -> call it through an OpenAI-compatible API.

    state.py       one running platform: settings, model names -> what serves them, deployments
    store.py       SQLite state: files, jobs, models, deployments (survives restarts)
    errors.py      4xx answers in OpenAI's error shape
    files.py       uploads: size limit, data check, stored by id
    jobs.py        the fine-tune request, its checks, the job directory, logs, checkpoints
    models.py      base and fine-tuned models; publishing; continuing a fine-tuned model
    scheduler.py   the queue: one job at a time, each in a worker process; restart recovery
    worker.py      the worker process: run_job + evaluation
    inference.py   loaded models shared by deployments, adapters switched per request, streaming
    openai_api.py  /v1/chat/completions, /v1/completions, /v1/models
    routes.py      /api/v1/... management endpoints
    app.py         the FastAPI application: auth and size guard, JSON errors, lifespan
    cli.py         `minipeft platform` and `minipeft job create|list|status|logs|cancel|deploy`
    client.py      the urllib client those commands use

Needs the `platform` extra (fastapi, uvicorn, python-multipart); the package imports them lazily
through app.py, so `import minipeft` never does.
"""
