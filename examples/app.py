# app.py
from flask import Flask, session

from shmkv.contrib.flask import ShmkvSessionInterface

app = Flask(__name__)  # the table: $SHMKV_URL, as the gunicorn master created it
app.session_interface = ShmkvSessionInterface(ttl=1800)

@app.post("/login")
def login():
    ...                      # check the password
    session.regenerate()     # a new id at login: no session fixation
    session["user_id"] = 42
    return "ok"

@app.get("/me")
def me():
    return {"user_id": session.get("user_id")}  # every worker knows who is logged in

@app.post("/logout")
def logout():
    session.clear()          # deletes the session: every worker forgets it at once
    return "ok"
