"""`tunelab ui`: a local web dashboard of the runs (live curves, comparison, a playground, a start form).

app.py has the routes, index.py the cached runs index, jobs.py starts and stops trainings, playground.py
chats with a run, security.py adds the login cookie and same-origin checks to the server's middleware,
static/ holds the page (plain HTML, CSS and JavaScript, with a small SVG line chart: nothing from a CDN).
"""
