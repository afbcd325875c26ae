// The console's only script (no inline script: the CSP allows 'self' only).
// After an action, move focus to its notice so keyboard and screen-reader users hear the outcome;
// on a page with an error, to the error.
document.addEventListener("DOMContentLoaded", () => {
  const target = document.querySelector("#problem, #done");
  if (target) {
    target.setAttribute("tabindex", "-1");
    target.focus();
  }
  // a confirmation form is sent once: disable its button on submit (no double revoke)
  const form = document.getElementById("confirm-form");
  if (form) {
    form.addEventListener("submit", () => {
      const button = form.querySelector("button[type=submit]");
      if (button) button.disabled = true;
    });
  }
});
