"""A Locust user for taskd: submit an echo task, then long-poll its result; now and then
read /stats as a dashboard would. Needs the optional `locust` package.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 \\
           --headless -u 50 -r 10 -t 60s

Locust's report groups result polls under one name, /tasks/[id]/result. Locust's own
client is gevent and requests, costly per request: for the server's ceiling use
loadtest.bench.
"""

from __future__ import annotations

from locust import HttpUser, between, task

RESULT_WAIT = 10  # seconds the server may hold a result request open


class TaskdUser(HttpUser):
    wait_time = between(0.0, 0.1)

    @task(10)
    def submit_and_wait(self) -> None:
        with self.client.post("/tasks", json={"task_type": "echo", "payload": {"from": "locust"}},
                              catch_response=True) as response:
            if response.status_code != 201:
                response.failure(f"submit answered {response.status_code}: {response.text[:200]}")
                return
            task_id = response.json()["id"]
        # 202 means still waiting after RESULT_WAIT: ask again, as a client would.
        for _ in range(3):
            with self.client.get(f"/tasks/{task_id}/result?wait={RESULT_WAIT}", name="/tasks/[id]/result",
                                 catch_response=True) as result:
                if result.status_code == 200:
                    if result.json().get("status") != "completed":
                        result.failure(f"task {task_id} ended {result.json().get('status')}")
                    return
                if result.status_code != 202:
                    result.failure(f"result answered {result.status_code}")
                    return
                result.success()

    @task(1)
    def stats(self) -> None:
        self.client.get("/stats")
