/* rollbackd operator page: polls /page/live, runs the token-guarded controls. Plain ES2017. */
(function () {
  "use strict";
  var KEY = "rollbackd.control-token";
  var root = document.documentElement;
  root.classList.add("js");

  var main, live, messages, form, input, why, forget;
  var pending = null; // the control waiting for a token: {url, label}
  var timer = null;
  var busy = false;
  var declined = false; // the token form was cancelled: not asked again until a click

  function token() {
    try { return window.sessionStorage.getItem(KEY) || ""; } catch (e) { return ""; }
  }
  function keep(value) {
    try {
      if (value) { window.sessionStorage.setItem(KEY, value); } else { window.sessionStorage.removeItem(KEY); }
    } catch (e) { /* storage off: the token lives until the page is left */ }
    forget.hidden = !value;
  }
  function headers() {
    var t = token();
    return t ? { "Authorization": "Bearer " + t } : {};
  }
  function say(text, kind) {
    messages.textContent = text;
    messages.className = "messages" + (kind ? " " + kind : "");
  }
  function stamp(text, state) {
    live.textContent = text;
    live.setAttribute("data-state", state);
  }
  function ask(reason) {
    why.textContent = reason;
    form.hidden = false;
    input.value = "";
    input.focus();
  }

  function place(sections) {
    Object.keys(sections).forEach(function (name) {
      var target = document.querySelector('[data-section="' + name + '"]');
      if (target && target.innerHTML !== sections[name]) {
        target.innerHTML = sections[name]; // rendered and escaped by the daemon
      }
    });
  }

  function poll() {
    window.clearTimeout(timer);
    if (document.hidden) { return; }
    fetch(main.getAttribute("data-live"), { headers: headers(), cache: "no-store", credentials: "omit" })
      .then(function (answer) {
        if (answer.status === 401) {
          if (token()) { keep(""); say("The daemon refused the stored token.", "error"); }
          stamp("locked", "locked");
          if (form.hidden && !declined) { ask("This daemon shows its status only with the control token."); }
          return null;
        }
        if (!answer.ok) { throw new Error("HTTP " + answer.status); }
        return answer.json();
      })
      .then(function (data) {
        if (data) {
          place(data.sections);
          main.setAttribute("data-locked", "false");
          stamp("live, updated " + new Date(data.at * 1000).toISOString().slice(11, 19) + "Z", "live");
        }
      })
      .catch(function (error) {
        stamp("not updated (" + error.message + "), retrying", "lost");
      })
      .then(schedule);
  }
  function schedule() {
    window.clearTimeout(timer);
    timer = window.setTimeout(poll, Number(main.getAttribute("data-poll")) || 2000);
  }

  function act(url, label, button) {
    if (!token()) {
      pending = { url: url, label: label };
      ask("The control token is needed to " + label + ".");
      return;
    }
    if (busy) { return; }
    if (!window.confirm("Really " + label + "?")) { return; }
    busy = true;
    if (button) { button.disabled = true; }
    say("Sending: " + label + "…");
    fetch(url, {
      method: "POST", headers: headers(), cache: "no-store", credentials: "omit"
    })
      .then(function (answer) {
        return answer.json().catch(function () { return {}; }).then(function (body) {
          if (answer.status === 401) {
            keep("");
            say("Refused: the daemon did not accept the control token (" + label + " not done).", "error");
          } else if (answer.ok) {
            say("Done: " + label + ". " + summary(body), "ok");
          } else {
            say("Not done (" + answer.status + "): " + (body.message || body.error || "no reason given"), "error");
          }
        });
      })
      .catch(function (error) { say("Not sent: " + error.message, "error"); })
      .then(function () { busy = false; if (button) { button.disabled = false; } poll(); });
  }
  function summary(body) {
    var parts = [];
    Object.keys(body || {}).forEach(function (key) {
      var value = body[key];
      if (value !== null && typeof value !== "object") { parts.push(key + ": " + value); }
    });
    return parts.join(", ");
  }

  function start() {
    main = document.getElementById("page");
    live = document.getElementById("live");
    messages = document.getElementById("messages");
    form = document.getElementById("token-form");
    input = document.getElementById("token-input");
    why = document.getElementById("token-why");
    forget = document.getElementById("forget-token");
    if (!main || !form) { return; }
    forget.hidden = !token();

    form.addEventListener("submit", function (event) {
      event.preventDefault(); // never submitted: the token goes in a header, never in a URL
      var value = input.value.trim();
      if (!value) { say("Enter the control token first.", "error"); return; }
      keep(value);
      input.value = "";
      form.hidden = true;
      say("");
      var next = pending;
      pending = null;
      if (next) { act(next.url, next.label, null); } else { poll(); }
    });
    document.getElementById("token-cancel").addEventListener("click", function () {
      pending = null;
      declined = true;
      input.value = "";
      form.hidden = true;
    });
    forget.addEventListener("click", function () { keep(""); say("Token forgotten for this tab."); });
    document.addEventListener("click", function (event) {
      if (event.target.closest && event.target.closest("button[data-unlock]")) {
        declined = false;
        ask("This daemon shows its status only with the control token.");
        return;
      }
      var button = event.target.closest ? event.target.closest("button[data-act]") : null;
      if (button) {
        event.preventDefault();
        act(button.getAttribute("data-url"), button.getAttribute("data-label") || button.textContent, button);
      }
    });
    document.addEventListener("visibilitychange", function () { if (!document.hidden) { poll(); } });
    if (main.getAttribute("data-locked") === "true") { poll(); } else { schedule(); }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
