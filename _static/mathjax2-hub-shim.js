/*
 * The Jupyter widget manager (@jupyter-widgets/html-manager 1.x) typesets widget labels
 * with the MathJax 2 call MathJax.Hub.Queue(["Typeset", MathJax.Hub, element]). The book
 * loads MathJax 3, which has no Hub, so every label threw a TypeError. This shim gives
 * MathJax 3 a Hub whose Queue typesets the element with MathJax 3 once it is ready.
 *
 * It runs after Sphinx's inline `window.MathJax = {...}` configuration and before the
 * deferred MathJax script: it adds the Hub to that configuration object (for labels drawn
 * before MathJax starts) and to the MathJax 3 object that replaces it; queued labels are
 * typeset in startup.ready.
 */
(function () {
  "use strict";
  var pending = [];
  var ready = false;

  function flush() {
    var mj = window.MathJax;
    if (!ready || !pending.length || !mj || typeof mj.typesetPromise !== "function") {
      return;
    }
    var elements = pending.splice(0, pending.length);
    mj.typesetPromise(elements).catch(function (err) {
      console.warn("MathJax could not typeset a widget label:", err);
    });
  }

  var hub = {
    Queue: function () {
      for (var i = 0; i < arguments.length; i++) {
        var job = arguments[i];
        if (Array.isArray(job) && job[0] === "Typeset" && job[2] instanceof Element) {
          pending.push(job[2]);
        } else if (typeof job === "function") {
          job();
        }
      }
      flush();
    },
  };

  function addHub(mj) {
    if (mj && !mj.Hub) {
      // not enumerable: MathJax 3 reads the keys of its configuration object
      Object.defineProperty(mj, "Hub", { value: hub, configurable: true, writable: true });
    }
  }

  var config = window.MathJax;
  if (!config || config.version) {
    return; // no MathJax on this page, or it is already running (nothing to hook)
  }
  addHub(config);
  // MathJax 3 replaces window.MathJax with its own object when its script runs: give that
  // object the Hub at once (labels drawn between then and startup.ready are queued)
  var current = config;
  Object.defineProperty(window, "MathJax", {
    configurable: true,
    enumerable: true,
    get: function () {
      return current;
    },
    set: function (value) {
      current = value;
      addHub(value);
    },
  });
  config.startup = config.startup || {};
  var userReady = config.startup.ready;
  config.startup.ready = function () {
    if (typeof userReady === "function") {
      userReady();
    } else {
      window.MathJax.startup.defaultReady();
    }
    addHub(window.MathJax);
    ready = true;
    flush();
  };
})();
