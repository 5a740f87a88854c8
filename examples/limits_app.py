# limits_app.py
from flask import Flask
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

import shmkv.contrib.limits  # noqa: F401 - registers shmkv:// with limits: before Limiter()

app = Flask(__name__)
limiter = Limiter(get_remote_address, app=app, default_limits=["10 per minute"],
                  storage_uri="shmkv://ratelimits?capacity=100000")

@app.get("/")
def index():
    return "hello"
