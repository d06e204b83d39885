"""GitHub: what the pipeline tells it (statuses, a pull request summary, deployments) and
how a repository is set up for the pipeline (`cicd github setup`).

    client.py        the REST client (githubkit): retries, rate limits, errors
"""
