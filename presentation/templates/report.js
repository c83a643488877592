{#- Hovering anything that belongs to a stage dims everything that belongs to another stage. -#}
(function () {
  var items = document.querySelectorAll('[data-stage]');
  function mark(stage) {
    for (var i = 0; i < items.length; i++) {
      var s = items[i].getAttribute('data-stage');
      if (stage !== null && s !== stage) { items[i].classList.add('dim'); } else { items[i].classList.remove('dim'); }
    }
  }
  for (var i = 0; i < items.length; i++) {
    items[i].addEventListener('mouseenter', function (ev) { mark(ev.currentTarget.getAttribute('data-stage')); });
    items[i].addEventListener('mouseleave', function () { mark(null); });
  }
})();
