"""``deferrun web``: a status page (HTML and ``/api/...`` JSON) for a deferrun database."""
