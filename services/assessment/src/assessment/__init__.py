"""Quizzes and grading."""
