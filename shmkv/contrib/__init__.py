"""Glue between shmkv and the servers people run: Flask sessions (``shmkv.contrib.flask``),
Django's cache (``shmkv.contrib.django``) and a gunicorn config whose master creates the
table (``shmkv.contrib.gunicorn_conf``)."""
