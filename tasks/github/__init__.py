"""GitHub: what the pipeline tells it (statuses, a pull request summary, deployments) and
how a repository is set up for the pipeline (`cicd github setup`).

    client.py        the REST client (githubkit): retries, rate limits, errors
    statuses.py      a CI run's commit statuses per stage group, the pull request summary
    deployments.py   GitHub deployments and their statuses
    report.py        the flows' call points: a `ci` hook, a promotion's deploy, rollbacks
    repository.py    branch protection, environments, sealed Actions secrets
"""
