"""Getting set up: ``init`` registers the Quota app and writes the files; ``gen-secret``.

developer   Quota's developer API: sign in (``/auth/login``), register an app
options     what ``init`` is asked: flags, and questions at a terminal for what is missing
files       what ``init`` writes (config YAML, ``.env``, Kubernetes Secret), all or none
init_cmd    the ``init`` command: sign in → register → write → report
gen_secret  fresh random secrets for ``SESSION_SECRET`` and ``tokens.encryption_keys``
"""
