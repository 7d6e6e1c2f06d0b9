"""FlexOlmo, the method, in its order: the public model, one expert per data owner, router
rows from domain embeddings, the merge, router tuning (docs/method.md)."""
