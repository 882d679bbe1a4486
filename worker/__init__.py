"""The Conch training worker: a Celery app whose one task fine-tunes a base model with LoRA.

The task and the runner stay light (no torch at import) so that a duplicate delivery is refused cheaply and the
worker's parent process never touches an accelerator; the real work lives in ``worker.pipeline``.
"""
