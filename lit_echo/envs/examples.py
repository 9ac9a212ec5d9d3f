"""Small example environments: the README's "Your own environment" walk-through runs this one."""

from __future__ import annotations

from lit_echo.envs.base import StepResult


class GuessNumber:
    """The agent guesses a number in 1..high and is told higher or lower; reward 1 for the right guess."""

    def __init__(self, high: int = 100, max_guesses: int = 8):
        self.high, self.max_guesses = high, max_guesses

    def reset(self, seed: int) -> list[dict]:
        self.target, self.guesses = seed % self.high + 1, 0  # the G rollouts of a group share the seed: same task
        return [{"role": "system", "content": "Reply with a number only."},
                {"role": "user", "content": f"Guess my number between 1 and {self.high}."}]

    def step(self, action: str) -> StepResult:
        self.guesses += 1
        done = self.guesses >= self.max_guesses
        info = {"task_type": f"guess-1-{self.high}", "valid_action": action.strip().isdigit(), "success": False}
        if not info["valid_action"]:
            return StepResult("", warning="WARNING: reply with a number only.\n", done=done, info=info)
        guess = int(action.strip())
        if guess == self.target:
            return StepResult("Correct!", reward=1.0, done=True, info={**info, "success": True})
        return StepResult("higher" if guess < self.target else "lower", done=done, info=info)
