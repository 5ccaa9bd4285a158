"""The life of a run: the registry, where runs stand (status), submission, the life cycle (follow,
cancel, resume, retry after cluster failures), what runs used (usage) and what they wrote
(artifacts). No typer, no rich: commands render what these functions return."""
